"""Safe-loading audit of the whole package, by reading its syntax tree (comments and strings
cannot trigger or hide a finding):

- weights only through safetensors or `torch.load(..., weights_only=True)`;
- `trust_remote_code` never hard-wired to True (it must come from a user's config flag);
- no pickle/marshal/dill/joblib loading, no `numpy.load(allow_pickle=True)`, no `yaml.load`
  without a safe loader, no `save_pretrained(safe_serialization=False)`;
- no `eval`/`exec` of strings.

Each rule is first shown to fire on a bad snippet, so the audit cannot pass by finding nothing.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "framelm"
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "joblib", "marshal", "shelve", "cloudpickle"}


def _dotted(node: ast.AST) -> str:
    """`torch.load` for the call target `torch.load`, '' when it is not a plain dotted name."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return ""


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_const(node: ast.expr | None, value: object) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def audit_source(source: str, filename: str = "<snippet>") -> list[str]:
    """Findings (`file:line: what`) for one module's source."""
    tree = ast.parse(source, filename)
    found = []

    def flag(node: ast.AST, what: str) -> None:
        found.append(f"{filename}:{node.lineno}: {what}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in UNSAFE_MODULES:
                    flag(node, f"imports {alias.name} (deserialises arbitrary objects)")
        elif isinstance(node, ast.ImportFrom):
            if (node.module or "").split(".")[0] in UNSAFE_MODULES:
                flag(node, f"imports from {node.module} (deserialises arbitrary objects)")
        elif isinstance(node, ast.Dict):
            for k, v in zip(node.keys, node.values):
                if isinstance(k, ast.Constant) and k.value == "trust_remote_code" and _is_const(v, True):
                    flag(node, "trust_remote_code=True hard-wired (must come from a user flag)")
        elif isinstance(node, ast.Call):
            target = _dotted(node.func)
            short = target.rsplit(".", 1)[-1]
            if target == "torch.load" and not _is_const(_keyword(node, "weights_only"), True):
                flag(node, "torch.load without weights_only=True")
            if short == "load" and target.split(".")[0] in ("np", "numpy") and _is_const(_keyword(node, "allow_pickle"), True):
                flag(node, "numpy.load with allow_pickle=True")
            if target in ("yaml.load", "yaml.load_all", "yaml.unsafe_load", "yaml.full_load"):
                loader = _keyword(node, "Loader")
                if target != "yaml.load" or loader is None or "Safe" not in _dotted(loader):
                    flag(node, f"{target} without a safe loader (use yaml.safe_load)")
            if _is_const(_keyword(node, "trust_remote_code"), True):
                flag(node, "trust_remote_code=True hard-wired (must come from a user flag)")
            if short == "save_pretrained" and _is_const(_keyword(node, "safe_serialization"), False):
                flag(node, "save_pretrained(safe_serialization=False) writes pickled weights")
            if short == "from_pretrained" and _is_const(_keyword(node, "use_safetensors"), False):
                flag(node, "from_pretrained(use_safetensors=False) loads pickled weights")
            if target in ("eval", "exec"):
                flag(node, f"{target}() of a string")
    return found


@pytest.mark.parametrize("snippet, finding", [
    ("import torch\ntorch.load(path)", "torch.load without weights_only=True"),
    ("import torch\ntorch.load(path, weights_only=False)", "torch.load without weights_only=True"),
    ("import pickle\n", "imports pickle"),
    ("from joblib import load\n", "imports from joblib"),
    ("import numpy as np\nnp.load(p, allow_pickle=True)", "allow_pickle=True"),
    ("import yaml\nyaml.load(text)", "yaml.load without a safe loader"),
    ("import yaml\nyaml.load(text, Loader=yaml.FullLoader)", "yaml.load without a safe loader"),
    ("AutoModel.from_pretrained(p, trust_remote_code=True)", "trust_remote_code=True hard-wired"),
    ("lm_eval(model_args={'trust_remote_code': True})", "trust_remote_code=True hard-wired"),
    ("model.save_pretrained(p, safe_serialization=False)", "safe_serialization=False"),
    ("AutoModel.from_pretrained(p, use_safetensors=False)", "use_safetensors=False"),
    ("eval(user_text)", "eval() of a string"),
])
def test_each_rule_fires_on_unsafe_code(snippet, finding):
    found = audit_source(snippet)
    assert len(found) == 1 and finding in found[0], found


def test_safe_forms_pass():
    safe = (
        "import torch, yaml\n"
        "torch.load(p, weights_only=True, map_location='cpu')\n"
        "yaml.safe_load(text)\n"
        "yaml.load(text, Loader=yaml.SafeLoader)\n"
        "AutoModel.from_pretrained(p, trust_remote_code=cfg.trust_remote_code)\n"
        "model.save_pretrained(p)\n"
    )
    assert audit_source(safe) == []


def test_package_loads_only_safe_formats():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) >= 8, f"expected the framelm package under {PACKAGE}, found {len(files)} modules"
    findings = [f for path in files for f in audit_source(path.read_text(), str(path.relative_to(PACKAGE.parent)))]
    assert not findings, "unsafe loading in the package:\n" + "\n".join(findings)


def _flag_defaults(cls: type, where: str, name: str) -> dict[str, object]:
    """Default of every field called `name` in a config dataclass and its nested dataclasses."""
    import dataclasses
    import typing

    out = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name == name:
            out[f"{where}.{f.name}"] = f.default
        elif dataclasses.is_dataclass(hints[f.name]):
            out.update(_flag_defaults(hints[f.name], f"{where}.{f.name}", name))
    return out


def test_trust_remote_code_is_a_config_flag_defaulting_to_false():
    """Wherever the package passes trust_remote_code, some config dataclass declares it, off by default."""
    import importlib

    from framelm.stages import STAGES

    uses = [p for p in PACKAGE.rglob("*.py") if "trust_remote_code" in p.read_text()]
    if not uses:
        pytest.skip("no module passes trust_remote_code: remote code can never run")
    flags = {}
    for stage in STAGES.values():
        module, cls_name = stage.config.split(":")
        cls = getattr(importlib.import_module(module), cls_name)
        flags.update(_flag_defaults(cls, stage.name, "trust_remote_code"))
    assert flags, f"{[str(p) for p in uses]} pass trust_remote_code but no stage config declares the flag"
    assert all(v is False for v in flags.values()), f"trust_remote_code must default to False: {flags}"
