"""Package direction: model <- parallel <- kv_transfer <- engine <- server, and the network tier (router,
deploy, bench, the sidecar) never imports torch. Every import counts, function-local ones included:
a lazy import is still a dependency."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import wideep

ROOT = Path(wideep.__file__).parent

# lower rank = lower layer; a module may import only its own package or lower ranks
RANK = {"utils": 0, "envs": 0, "errors": 0, "typed_config": 0, "logs": 0,
        "model": 1, "parallel": 2, "kv_transfer": 3, "engine": 4, "server": 5,
        "cli": 9, "__main__": 9, "__init__": 9}  # the top: the root package re-exports LLM lazily
NETWORK = {"router", "deploy", "bench"}
# torch-free leaves the network tier may use: the wire contract of P/D params and EngineArgs' field names
NETWORK_MAY_USE = {"wideep.kv_transfer.params", "wideep.engine.config"}


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _imports(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module))
            # `from wideep import engine` names a package, not an attribute
            if node.module == "wideep":
                out += [(node.lineno, f"wideep.{a.name}") for a in node.names]
    return out


def upward_imports(root: Path = ROOT) -> list[str]:
    bad = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        src = rel.parts[0].removesuffix(".py")
        for line, module in _imports(path):
            if not module.startswith("wideep."):
                continue
            dst = _package(module)
            if dst == src:
                continue
            where = f"wideep/{rel}:{line} imports {module}"
            if src in NETWORK:
                if dst in NETWORK or dst == "utils" or RANK.get(dst) == 0 or module in NETWORK_MAY_USE:
                    continue
                bad.append(where + " (the network tier stays off the model stack)")
            elif src in RANK and dst in NETWORK:
                if RANK[src] < 9:
                    bad.append(where + " (core packages do not import the network tier)")
            elif src in RANK and RANK.get(dst, 99) > RANK[src]:
                bad.append(where + f" ({src} sits below {dst})")
            elif src not in RANK and src not in NETWORK:
                bad.append(where + f" (package {src!r} has no place in the direction table)")
    return bad


def test_no_upward_imports():
    assert upward_imports() == []


def test_the_check_catches_an_upward_import(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "x.py").write_text("def f():\n    from wideep.engine.core import EngineCore\n")
    (tmp_path / "router").mkdir()
    (tmp_path / "router" / "y.py").write_text("from wideep.model import loader\n")
    assert [b.split(" imports ")[1] for b in upward_imports(tmp_path)] == \
        ["wideep.engine.core (model sits below engine)",
         "wideep.model (the network tier stays off the model stack)"]


def test_network_tier_never_loads_torch():
    modules = sorted({".".join(("wideep",) + p.relative_to(ROOT).with_suffix("").parts)
                      for pkg in NETWORK for p in (ROOT / pkg).rglob("*.py")} | NETWORK_MAY_USE)
    modules = [m.removesuffix(".__init__") for m in modules]
    code = ("import importlib, json, sys\n"
            f"for m in {modules!r}:\n    importlib.import_module(m)\n"
            "print(json.dumps(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.splitlines()[-1]) == []
