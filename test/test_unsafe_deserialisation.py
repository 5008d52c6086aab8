"""No code-executing deserialisation in the package (issue 12, part 7).

An ``ast`` scan of every module of rt2_ros, tools and launch for the calls that can run code chosen
by whoever wrote the bytes: pickle and friends, unsafe YAML loaders, ``torch.load`` without
``weights_only=True``, ``numpy.load(allow_pickle=True)``, ``eval``/``exec``/``compile``,
``subprocess`` with ``shell=True``, imports of names computed at run time, and msgpack decoding
with a hook (the hook decides what objects outside bytes become; each is judged). A self-test feeds
the scanner one snippet per pattern, so the scan cannot pass by finding nothing.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCANNED = ("rt2_ros", "tools", "launch")

_PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "shelve", "marshal", "cloudpickle", "joblib", "jsonpickle"}
_PICKLE_CALLS = {"load", "loads", "Unpickler", "open"}
_SAFE_YAML_LOADERS = {"SafeLoader", "CSafeLoader", "BaseLoader", "CBaseLoader"}

# (path, finding) -> why it is acceptable. Only operator input may reach these, never outside bytes.
ALLOWED: dict[tuple[str, str], str] = {
    ("rt2_ros/serve.py", "import_module(non-constant)"):
        "--backend-class MODULE:CLASS is an operator's command-line flag on the server, not data from a client",
    ("rt2_ros/backends/__init__.py", "import_module(non-constant)"):
        "imports the module of a backend type from the fixed BACKENDS registry (names in the code)",
    ("rt2_ros/params_doc.py", "import_module(non-constant)"): "the fixed table of parameter lists in that module",
    ("rt2_ros/recording.py", "import_module(non-constant)"):
        "rt2-record imports the message types of the topics it is told to record (operator input); rt2-replay "
        "decodes with the schemas in the file and never imports by name",
    ("rt2_ros/nodes/bringup.py", "yaml.load() without a safe Loader"):
        "_RclLoader is a yaml.SafeLoader subclass that only changes how plain scalars are typed",
    ("rt2_ros/backends/openpi.py", "msgpack.unpackb(object_hook=_unpack_array)"):
        "the hook turns openpi's __ndarray__/__npgeneric__ maps into numpy values with np.frombuffer and a "
        "plain dtype (object, zero-size and sub-array dtypes refused); it looks no type up by name and runs no "
        "code from the frame (fuzzed: test_fuzz.py openpi_reply)",
}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _kw(call: ast.Call, name: str) -> ast.AST | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_true(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def findings(source: str) -> list[tuple[int, str]]:
    """(line, what) for every dangerous call in ``source``."""
    out: list[tuple[int, str]] = []
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for name in names:
                if name.split(".")[0] in _PICKLE_MODULES:
                    out.append((node.lineno, f"import {name}"))
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        head, _, last = name.rpartition(".")
        if (head.split(".")[-1] in _PICKLE_MODULES and last in _PICKLE_CALLS) or \
                name in ("yaml.unsafe_load", "yaml.full_load", "yaml.unsafe_load_all", "yaml.full_load_all"):
            out.append((node.lineno, f"{name}()"))
        elif name in ("yaml.load", "yaml.load_all"):
            loader = _kw(node, "Loader") or (node.args[1] if len(node.args) > 1 else None)
            if loader is None or _dotted(loader).split(".")[-1] not in _SAFE_YAML_LOADERS:
                out.append((node.lineno, f"{name}() without a safe Loader"))
        elif last == "load" and head.split(".")[-1] == "torch":
            if not _is_true(_kw(node, "weights_only")):
                out.append((node.lineno, "torch.load() without weights_only=True"))
        elif last == "load" and head.split(".")[-1] in ("np", "numpy") and _is_true(_kw(node, "allow_pickle")):
            out.append((node.lineno, "numpy.load(allow_pickle=True)"))
        elif last in ("unpackb", "unpack", "Unpacker") and "msgpack" in head.split("."):
            # a hook decides which objects the bytes become: each one is judged and listed in ALLOWED
            for hook in ("object_hook", "object_pairs_hook", "list_hook", "ext_hook"):
                if _kw(node, hook) is not None:
                    out.append((node.lineno, f"{name}({hook}={_dotted(_kw(node, hook)) or '<expr>'})"))
        elif last == "read_pickle" or name in ("eval", "exec", "compile", "builtins.eval", "builtins.exec",
                                               "builtins.compile"):
            out.append((node.lineno, f"{name}()"))
        elif head.split(".")[-1] == "subprocess" and _is_true(_kw(node, "shell")):
            out.append((node.lineno, f"{name}(shell=True)"))
        elif name in ("os.system", "os.popen"):
            out.append((node.lineno, f"{name}()"))
        elif name in ("__import__", "importlib.import_module", "import_module") and \
                not (node.args and isinstance(node.args[0], ast.Constant)):
            out.append((node.lineno, "import_module(non-constant)"))
    return out


def scanned_files() -> list[Path]:
    return sorted(p for d in SCANNED for p in (REPO / d).rglob("*.py") if "proto" not in p.parts)


def test_the_package_has_no_code_executing_deserialisation():
    files = scanned_files()
    assert len(files) > 30, files  # the scan looked at the package, not at an empty directory
    bad, used = [], set()
    for path in files:
        rel = str(path.relative_to(REPO))
        for line, what in findings(path.read_text()):
            if (rel, what) in ALLOWED:
                used.add((rel, what))
            else:
                bad.append(f"{rel}:{line}: {what}")
    assert not bad, "code-executing deserialisation (or an unlisted dynamic import):\n" + "\n".join(bad)
    assert used == set(ALLOWED), f"allowlist entries that match nothing any more: {set(ALLOWED) - used}"


@pytest.mark.parametrize("snippet, expected", [
    ("import pickle", "import pickle"),
    ("from dill import loads", "import dill"),
    ("x = pickle.loads(data)", "pickle.loads()"),
    ("x = cloudpickle.load(f)", "cloudpickle.load()"),
    ("x = yaml.load(text)", "yaml.load() without a safe Loader"),
    ("x = yaml.load(text, Loader=yaml.Loader)", "yaml.load() without a safe Loader"),
    ("x = yaml.unsafe_load(text)", "yaml.unsafe_load()"),
    ("x = yaml.full_load(text)", "yaml.full_load()"),
    ("x = yaml.load(text, yaml.UnsafeLoader)", "yaml.load() without a safe Loader"),
    ("x = yaml.load_all(text, Loader=FullLoader)", "yaml.load_all() without a safe Loader"),
    ("x = marshal.loads(data)", "marshal.loads()"),
    ("db = shelve.open(path)", "shelve.open()"),
    ("import jsonpickle", "import jsonpickle"),
    ("x = pd.read_pickle(path)", "pd.read_pickle()"),
    ("x = msgpack.unpackb(data, object_hook=hook)", "msgpack.unpackb(object_hook=hook)"),
    ("u = msgpack.Unpacker(f, ext_hook=make)", "msgpack.Unpacker(ext_hook=make)"),
    ("code = compile(text, 'f', 'exec')", "compile()"),
    ("x = torch.load(path)", "torch.load() without weights_only=True"),
    ("x = torch.load(path, weights_only=False)", "torch.load() without weights_only=True"),
    ("x = np.load(path, allow_pickle=True)", "numpy.load(allow_pickle=True)"),
    ("eval(text)", "eval()"),
    ("exec(code)", "exec()"),
    ("subprocess.run(cmd, shell=True)", "subprocess.run(shell=True)"),
    ("os.system(cmd)", "os.system()"),
    ("importlib.import_module(name)", "import_module(non-constant)"),
    ("__import__(name)", "import_module(non-constant)"),
])
def test_the_scanner_catches_each_pattern(snippet, expected):
    assert [what for _, what in findings(snippet)] == [expected]


@pytest.mark.parametrize("snippet", [
    "x = yaml.safe_load(text)", "x = yaml.load(text, Loader=yaml.SafeLoader)", "x = torch.load(p, weights_only=True)",
    "x = np.load(path)", "x = json.loads(text)", "importlib.import_module('rt2_ros.sim')", "model.eval()",
    "x = msgpack.unpackb(data)", "x = yaml.load(text, Loader=yaml.CSafeLoader)", "re.compile(pattern)",
])
def test_the_scanner_passes_safe_calls(snippet):
    assert findings(snippet) == []
