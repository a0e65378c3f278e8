"""Test-only (never installed): with WIDEEP_TEST_FORCED_OUTPUT=FILE on the path of a `wideep serve`
process tree (PYTHONPATH=this directory), a request whose `seed` is a key of FILE's JSON object
generates exactly that list of token ids (the script ends with EOS; past its end the last id repeats).
Everything else about the request runs as usual: engine, output processor, parsers, HTTP."""
import importlib.abc
import importlib.machinery
import json
import os
import sys

_PATH = os.environ.get("WIDEEP_TEST_FORCED_OUTPUT")


def _patch(module):
    with open(_PATH) as f:
        script = {int(k): v for k, v in json.load(f).items()}
    orig = module.Sampler.sample   # every path (__call__ and the device-side one) samples here

    def forced(self, logits, reqs):
        out = orig(self, logits, reqs).clone()
        for i, r in enumerate(reqs):
            seq = script.get(r.sampling_params.seed)
            if seq:
                out[i] = seq[min(r.num_output_tokens, len(seq) - 1)]
        return out

    module.Sampler.sample = forced


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "wideep.engine.sampler":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None:
            return None
        loader = spec.loader
        exec_module = loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            _patch(module)
        loader.exec_module = exec_and_patch
        return spec


if _PATH:
    sys.meta_path.insert(0, _Finder())
