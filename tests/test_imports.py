"""One import root: fluxjax's modules import each other without a cycle, in one direction (every
package ranked in LAYERS, a module imports only modules of its rank or below), the top level holds
only the base files, and nothing imports a top-level `convert`.

Read from the source with ast, so every import counts, function-local ones included.
"""

import ast
import pathlib
import re

REPO = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = REPO / "fluxjax"
# The small base files every layer may use; nothing else sits directly under fluxjax/. images.py (PNGs
# written atomically with their recipe) is one: files.py, the pipeline, training, batch and the commands use it.
BASE = ("config", "errors", "runtime", "files", "images")
# Lower layers never import higher ones. A module takes the rank of the longest prefix that names it
# (fluxjax/configs/ holds data only: the strategies' TOML files, read by parallel/strategies.py).
LAYERS = (
    *((f"fluxjax.{name}", 0) for name in BASE),
    ("fluxjax.kernels", 10),          # the CPU attention kernel and its build
    ("fluxjax.models", 20),           # Flax modules, and the quantized weights they consume
    ("fluxjax.parallel", 30),         # strategies (meshes, logical axis rules), multi-host runs
    ("fluxjax.loading", 40),          # checkpoint files -> parameter trees
    ("fluxjax.lora", 50),             # LoRA files (read with loading's key tables) and adapters
    ("fluxjax.loading.to_orbax", 55),  # the converter fuses LoRAs into what it writes: above lora
    ("fluxjax.sampling", 60),         # the loop (live LoRA inside), FlowEdit
    ("fluxjax.shapes", 70),           # the shapes dataset and weights: the pipeline reads its grammar
    ("fluxjax.pipeline", 80),         # FluxPipeline, text encoding, conditioning
    ("fluxjax", 90),                  # the package itself (__init__.py): the public names, re-exported
    ("fluxjax.training", 100),        # the trainer and its data
    ("fluxjax.shapes.recipe", 105),   # the recipe that trains the shapes model: above training
    ("fluxjax.plan", 110),            # plans and AOT compiles of what the pipeline and trainer run
    ("fluxjax.batch", 120),           # JSONL jobs and the multi-host batch runner
    ("fluxjax.testing", 130),         # PyTorch references (torch): tests and benchmarks only
    ("fluxjax.bench", 140),           # `fluxjax bench`
    ("fluxjax.commands", 150),        # the command line
)


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, pathlib.Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported(path: pathlib.Path, known: set[str]) -> set[str]:
    """The modules `path` imports, anywhere in the file: `from a import b` is a.b when a.b is a module."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in known else base)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: {m for m in imported(path, set(mods)) if m in mods and m != name} for name, path in mods.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the import graph as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def rank(module: str) -> int | None:
    """The rank of the longest LAYERS prefix naming `module`; "fluxjax" ranks only the package itself."""
    found = [(len(prefix), level) for prefix, level in LAYERS
             if module == prefix or (prefix != "fluxjax" and module.startswith(prefix + "."))]
    return max(found)[1] if found else None


def test_the_checker_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_between_fluxjax_modules():
    edges = graph()
    assert {"fluxjax", "fluxjax.pipeline.pipeline", "fluxjax.loading.registry"} <= set(edges)
    assert "fluxjax.loading.registry" in edges["fluxjax"]  # the public loaders, imported eagerly
    cycle = find_cycle(edges)
    assert cycle is None, " -> ".join(cycle)


def test_every_module_is_ranked():
    assert rank("fluxjax.pipeline.pipeline") == 80 and rank("fluxjax.shapes.recipe") == 105 and rank("fluxjax.x") is None
    unranked = [m for m in modules() if rank(m) is None]
    assert not unranked, unranked


def test_dependencies_point_one_way():
    wrong = [f"{a} ({rank(a)}) imports {b} ({rank(b)})" for a, deps in graph().items() for b in deps if rank(a) < rank(b)]
    assert not wrong, wrong


def test_the_top_level_holds_only_the_base_files():
    top = sorted(p.name for p in PACKAGE.iterdir() if p.suffix == ".py" or (p.is_file() and not p.name.startswith(".")))
    assert top == sorted(["__init__.py", *(f"{name}.py" for name in BASE)]), top


def test_every_package_says_its_responsibility():
    """Each folder of Python code is a package whose __init__.py has a docstring (its one-line job)."""
    folders = sorted({p.parent for p in PACKAGE.rglob("*.py")})
    assert len(folders) > 10
    silent = [str(f) for f in folders if not (f / "__init__.py").exists()
              or not ast.get_docstring(ast.parse((f / "__init__.py").read_text()))]
    assert not silent, silent


def test_no_lazy_attributes_on_the_package():
    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    assert not [n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "__getattr__"]


def test_nothing_imports_a_top_level_convert():
    """Not in code, nor in code held in strings (child processes) and notebooks. `.ci/` is left out:
    its smoke test checks that `import convert` fails in a wheel install."""
    assert not (REPO / "convert" / "__init__.py").exists()
    offenders = []
    files = [p for folder in ("fluxjax", "tests", "notebooks") for p in sorted((REPO / folder).rglob("*"))
             if p.suffix in (".py", ".ipynb") and p != pathlib.Path(__file__).resolve()]
    pattern = re.compile(r"(?:^|[;\"'])\s*(?:import|from)\s+convert\b|(?<![\w./])convert\.(?:flux|t5|clip|vae|table|to_orbax|safetensors_io)\b", re.M)
    for path in files:
        text = path.read_text()
        if path.suffix == ".py":
            for node in ast.walk(ast.parse(text, str(path))):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
                offenders += [f"{path}: import {n}" for n in names if n == "convert" or n.startswith("convert.")]
        offenders += [f"{path}: {m.group(0).strip()}" for m in pattern.finditer(text)]
    assert files and not offenders, offenders
