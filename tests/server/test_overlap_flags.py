"""`wideep serve` flags of issue 16: --async-scheduling, --enable-dbo and the DBO thresholds (vLLM names,
defaults 32 / 512) reach EngineArgs; bad thresholds name the flag."""
from __future__ import annotations

import argparse

import pytest

from wideep.server.args import add_serve_arguments, serve_config_from_args


def _config(model_dir, *flags):
    p = argparse.ArgumentParser()
    add_serve_arguments(p)
    return serve_config_from_args(p.parse_args([str(model_dir), *flags]))


def test_defaults_are_off_with_vllm_thresholds(tiny_model_dir):
    a = _config(tiny_model_dir).engine_args
    assert (a.async_scheduling, a.enable_dbo, a.dbo_decode_token_threshold, a.dbo_prefill_token_threshold) == \
        (False, False, 32, 512)


def test_flags_reach_engine_args(tiny_model_dir):
    a = _config(tiny_model_dir, "--async-scheduling", "--enable-dbo", "--dbo-decode-token-threshold", "64",
                "--dbo_prefill_token_threshold", "1024").engine_args
    assert (a.async_scheduling, a.enable_dbo, a.dbo_decode_token_threshold, a.dbo_prefill_token_threshold) == \
        (True, True, 64, 1024)


@pytest.mark.parametrize("flag", ["--dbo-decode-token-threshold", "--dbo-prefill-token-threshold"])
def test_negative_threshold_names_the_flag(tiny_model_dir, flag):
    with pytest.raises(ValueError, match=flag):
        _config(tiny_model_dir, flag, "-1")


def test_engine_args_reject_bad_thresholds():
    from wideep.engine.config import EngineArgs

    with pytest.raises(ValueError, match="dbo_decode_token_threshold"):
        EngineArgs(dbo_decode_token_threshold=-3)
