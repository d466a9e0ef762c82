#!/usr/bin/env python3
"""Structure report of a Python package (default: ``src/diffusers_wan_ext``), standard library only.

Usage::

    python3 scripts/structure_report.py [--json] [--src src/diffusers_wan_ext] [--top N]
    python3 scripts/structure_report.py --check [--allow scripts/structure_allow.txt]

It reads the package's files with :mod:`ast` and :mod:`tokenize` (it never imports them) and reports:

1. import cycles: strongly connected components of the module import graph (imports inside functions included,
   ``if TYPE_CHECKING:`` imports left out since they never run, ``importlib.import_module("<own module>")`` with a
   literal name counted as an import). Two readings: *explicit* (only the module each statement names) and *implicit*
   (plus the ``__init__`` of every package the named module sits in, except the packages the importing module is
   itself in, which are already loaded when it runs).
2. imports of the package's own modules placed inside functions (not under ``if TYPE_CHECKING:``).
3. imports of the package root from inside the package.
4. private names (``_x``) imported across modules, and imports of private modules (``ops/_triton.py``).
5. ``importlib`` / ``__import__`` uses.
6. functions longer than 100 and 50 lines (decorators included).
7. files longer than 500 lines.
8. per model family (:data:`FAMILIES`), the files outside ``families/<name>.py`` that name it (comments and
   docstrings skipped).
9. imports that go up the layer table (:data:`LAYERS`).

``--check`` exits 1 and prints the offending lines when any of these is found: an explicit import cycle, a private
name imported across modules, a private module imported from outside its subpackage, an ``importlib`` / ``__import__``
use (``importlib.metadata`` excepted), an import of the package root, an upward import, or a function-level import of
an own module that the allowlist (``scripts/structure_allow.txt``: ``path:function`` or ``path`` per line, a reason
after ``#``) does not name.
"""

from __future__ import annotations

import argparse
import ast
import io
import json
import os
import re
import sys
import tokenize
from dataclasses import dataclass, field
from pathlib import Path

#: Model families -> regex (case-insensitive; ``(?-i:...)`` marks a case-sensitive part) matched on each identifier
#: and string token. ``fun`` is bounded by non-letters so that ``function`` / ``functools`` do not count.
FAMILIES: dict[str, str] = {
    "longcat": r"longcat",
    "s2v": r"s2v|speech",
    "video_as_prompt": r"vap|video_?as_?prompt|videoasprompt",
    "animate": r"animate",
    "vace": r"vace",
    "fun": r"(?<![a-z])fun(?![a-z])|(?-i:Fun[A-Z0-9]|WanFun)",
    "speed_control": r"speed_?control|motion_?controller|motion_bucket",
}

#: Where each family is declared (excluded from its own count), relative to the package folder.
FAMILY_DECLARATION = "families/{name}.py"

#: Layers, lowest first. A unit is the first name below the package (``models``, ``demo`` for ``demo.py``);
#: ``__init__`` is the package root. A unit may import its own layer and the layers below it, never a higher one.
LAYERS: list[list[str]] = [
    ["utils", "ops"],
    ["models", "vae", "schedulers"],
    ["hooks", "runtime", "lora", "parallel", "conversion"],
    ["pipelines"],
    ["families"],
    ["release_converter", "training", "demo", "cli", "registration", "__init__"],
]

LONG_FUNCTION_LINES = (100, 50)
LONG_FILE_LINES = 500
DEFAULT_SRC = Path(__file__).resolve().parents[1] / "src" / "diffusers_wan_ext"
DEFAULT_ALLOW = Path(__file__).resolve().with_name("structure_allow.txt")


# ----------------------------------------------------------------------------------------------------------- model
@dataclass
class Import:
    """One import of an own module: a statement (or a literal ``importlib.import_module``), one row per target."""

    file: str
    line: int
    importer: str
    target: str
    names: list[str] = field(default_factory=list)
    kind: str = "from"  # "import", "from" or "dynamic"
    function: str | None = None  # qualified name of the enclosing function, None at module / class level
    type_checking: bool = False
    binds_root: bool = False  # ``import pkg.sub`` without ``as``: the root package is bound and walked through
    implicit: list[str] = field(default_factory=list)  # package ``__init__`` s the import also runs
    known: bool = True  # the target is a module of the package

    def where(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass
class Module:
    name: str
    path: Path
    rel: str
    is_package: bool
    tree: ast.Module | None = None
    text: str = ""


def _rel(path: Path, src: Path) -> str:
    """``path`` as ``<folder above the package>/<package>/...`` (``src/diffusers_wan_ext/cli.py``), whatever the
    working directory, so that reports of two checkouts compare line by line."""
    return (Path(src.parent.name) / path.relative_to(src.parent)).as_posix()


def discover(src: Path) -> tuple[str, dict[str, Module]]:
    """The package name and its modules by dotted name (a package is named by its ``__init__``)."""
    src = src.resolve()
    root = src.name
    modules: dict[str, Module] = {}
    for dirpath, dirnames, filenames in os.walk(src):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__" and not d.startswith("."))
        rel_dir = Path(dirpath).relative_to(src).parts
        pkg = ".".join((root, *rel_dir))
        if "__init__.py" not in filenames:  # namespace package: a node without a file
            modules.setdefault(pkg, Module(pkg, Path(dirpath), _rel(Path(dirpath), src), True))
        for fn in sorted(filenames):
            if not fn.endswith(".py"):
                continue
            path = Path(dirpath) / fn
            name = pkg if fn == "__init__.py" else f"{pkg}.{fn[:-3]}"
            text = path.read_text(encoding="utf-8")
            try:
                tree = ast.parse(text, str(path))
            except SyntaxError as e:  # a half-edited file: listed, its imports unknown
                tree, text = None, f"{e.msg} (line {e.lineno})"
            modules[name] = Module(name, path, _rel(path, src), fn == "__init__.py", tree, text)
    return root, modules


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _private_module_parent(target: str) -> str | None:
    """For ``pkg.ops._triton.x``: ``pkg.ops`` (the package the first private module sits in); else None."""
    parts = target.split(".")
    for i, part in enumerate(parts):
        if _is_private(part):
            return ".".join(parts[:i])
    return None


class _ImportVisitor(ast.NodeVisitor):
    """Collects the imports of one module, knowing the enclosing function and ``TYPE_CHECKING`` blocks."""

    def __init__(self, module: Module, root: str, modules: dict[str, Module]) -> None:
        self.module, self.root, self.modules = module, root, modules
        self.scope: list[str] = []
        self.functions = 0
        self.type_checking = False
        self.imports: list[Import] = []
        self.importlib_uses: list[dict] = []
        self.private_names: list[dict] = []
        #: names bound to a string constant anywhere in the module (resolves ``import_module(name)``)
        self.string_names = {
            t.id: n.value for n in ast.walk(module.tree) if isinstance(n, ast.Assign)
            and isinstance(n.value, ast.Constant) and isinstance(n.value.value, str)
            for t in n.targets if isinstance(t, ast.Name)
        }

    # -- helpers
    def _resolve_in_package(self, dotted: str) -> str | None:
        """The longest prefix of ``dotted`` that is a module of the package (None if outside the package)."""
        if dotted != self.root and not dotted.startswith(self.root + "."):
            return None
        parts = dotted.split(".")
        for i in range(len(parts), 0, -1):
            cand = ".".join(parts[:i])
            if cand in self.modules:
                return cand
        return self.root

    def _base(self, node: ast.ImportFrom) -> str | None:
        if not node.level:
            return node.module
        pkg = self.module.name if self.module.is_package else self.module.name.rpartition(".")[0]
        parts = pkg.split(".")
        if node.level - 1 >= len(parts):
            return None
        base = ".".join(parts[: len(parts) - (node.level - 1)])
        return f"{base}.{node.module}" if node.module else base

    def _implicit(self, target: str) -> list[str]:
        own = set(_ancestors(self.module.name))
        if self.module.is_package:
            own.add(self.module.name)
        return [a for a in _ancestors(target) if a not in own and a in self.modules]

    def _add(self, node: ast.AST, target: str, names: list[str], kind: str, binds_root: bool = False) -> Import:
        imp = Import(
            file=self.module.rel,
            line=node.lineno,
            importer=self.module.name,
            target=target,
            names=names,
            kind=kind,
            function=".".join(self.scope) if self.functions else None,
            type_checking=self.type_checking,
            binds_root=binds_root,
            implicit=self._implicit(target),
            known=target in self.modules,
        )
        self.imports.append(imp)
        return imp

    def _importlib(self, node: ast.AST, what: str, metadata_only: bool) -> None:
        self.importlib_uses.append({"file": self.module.rel, "line": node.lineno, "what": what,
                                    "metadata_only": metadata_only})

    # -- scopes
    def _scoped(self, node: ast.AST, is_function: bool) -> None:
        self.scope.append(node.name)
        self.functions += is_function
        self.generic_visit(node)
        self.functions -= is_function
        self.scope.pop()

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self._scoped(node, True)

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self._scoped(node, False)

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        is_tc = (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
            isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
        if not is_tc:
            return self.generic_visit(node)
        self.visit(node.test)
        saved, self.type_checking = self.type_checking, True
        for stmt in node.body:
            self.visit(stmt)
        self.type_checking = saved
        for stmt in node.orelse:
            self.visit(stmt)

    # -- imports
    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.name == "importlib" or alias.name.startswith("importlib."):
                self._importlib(node, f"import {alias.name}", alias.name.startswith("importlib.metadata"))
            target = self._resolve_in_package(alias.name)
            if target is not None:
                binds_root = alias.asname is None and "." in alias.name
                self._add(node, target, [], "import", binds_root)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = self._base(node)
        names = [a.name for a in node.names]
        if base and (base == "importlib" or base.startswith("importlib.")):
            meta = base.startswith("importlib.metadata") or names == ["metadata"]
            self._importlib(node, f"from {base} import {', '.join(names)}", meta)
        if base is None:
            return
        base_mod = self._resolve_in_package(base)
        if base_mod is None:
            return
        if base_mod != base:  # `from .missing import x`: keep the unresolved name visible
            base_mod = base
        from_base: list[str] = []
        for name in names:
            sub = f"{base}.{name}"
            if name != "*" and sub in self.modules:
                self._add(node, sub, [name], "from")
            else:
                from_base.append(name)
                if _is_private(name):
                    self.private_names.append({"file": self.module.rel, "line": node.lineno, "name": name,
                                               "source": base_mod, "importer": self.module.name,
                                               "type_checking": self.type_checking})
        if from_base:
            self._add(node, base_mod, from_base, "from")

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        fname = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
        if fname == "__import__":
            self._importlib(node, "__import__(...)", False)
        if fname in ("import_module", "__import__") and node.args:
            arg = node.args[0]
            if isinstance(arg, ast.Name):  # `name = "pkg.mod"; import_module(name)`
                arg = self.string_names.get(arg.id, arg)
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                target = self._resolve_in_package(arg.value)
                if target is not None:
                    self._add(node, target, [], "dynamic")
        self.generic_visit(node)


# ---------------------------------------------------------------------------------------------------------- graph
def strongly_connected(nodes: list[str], edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm (iterative); components of more than one node, largest first."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for start in nodes:
        if start in index:
            continue
        work = [(start, iter(sorted(edges.get(start, ()))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, it = work[-1]
            advanced = False
            for nxt in it:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(edges.get(nxt, ())))))
                    advanced = True
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    n = stack.pop()
                    on_stack.discard(n)
                    comp.append(n)
                    if n == node:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return sorted(out, key=lambda c: (-len(c), c))


def _cycles(imports: list[Import], modules: dict[str, Module], implicit: bool) -> dict:
    edges: dict[str, set[str]] = {}
    sites: dict[tuple[str, str], list[str]] = {}
    for imp in imports:
        if imp.type_checking:
            continue
        targets = [imp.target] + (imp.implicit if implicit else [])
        for t in targets:
            if t == imp.importer or t not in modules:
                continue
            edges.setdefault(imp.importer, set()).add(t)
            tag = "" if t == imp.target else f" (implied by {imp.target})"
            tag += " [in function]" if imp.function else ""
            sites.setdefault((imp.importer, t), []).append(imp.where() + tag)
    comps = strongly_connected(sorted(modules), edges)
    detail = []
    for comp in comps:
        members = set(comp)
        inner = [f"{a} -> {b}  @ {', '.join(sites[(a, b)])}" for a in comp for b in sorted(edges.get(a, ()))
                 if b in members]
        detail.append({"modules": comp, "edges": inner})
    return {"modules_in_cycles": sum(len(c) for c in comps), "sccs": detail}


def _unit(name: str, root: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _layer_of(unit: str) -> int | None:
    for i, units in enumerate(LAYERS):
        if unit in units:
            return i
    return None


# --------------------------------------------------------------------------------------------------------- metrics
#: tokens the family regexes look at: identifiers and strings (Python 3.12+ splits f-strings into parts)
_FAMILY_TOKENS = {tokenize.NAME, tokenize.STRING, getattr(tokenize, "FSTRING_MIDDLE", tokenize.STRING)}


def _family_hits(module: Module, patterns: dict[str, re.Pattern]) -> dict[str, list[str]]:
    """Family -> matched tokens of the module (identifiers and non-docstring strings; comments dropped)."""
    doc_starts = set()
    for node in ast.walk(module.tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                    and isinstance(first.value.value, str):
                doc_starts.add((first.value.lineno, first.value.col_offset))
    hits: dict[str, list[str]] = {}
    for tok in tokenize.generate_tokens(io.StringIO(module.text).readline):
        if tok.type not in _FAMILY_TOKENS:
            continue
        if tok.type == tokenize.STRING and tok.start in doc_starts:
            continue
        for fam, pat in patterns.items():
            if pat.search(tok.string):
                hits.setdefault(fam, []).append(tok.string if len(tok.string) <= 60 else tok.string[:57] + "...")
    return hits


def _functions(module: Module) -> list[dict]:
    out = []

    def walk(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                qual = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    first = min([child.lineno] + [d.lineno for d in child.decorator_list])
                    out.append({"file": module.rel, "line": first, "function": qual,
                                "lines": child.end_lineno - first + 1})
                walk(child, qual + ".")
            else:
                walk(child, prefix)

    walk(module.tree, "")
    return out


def load_allowlist(path: Path | None) -> list[tuple[str, str | None]]:
    """``path:function`` / ``path`` entries (text after ``#`` is the reason)."""
    if path is None or not Path(path).is_file():
        return []
    entries = []
    for raw in Path(path).read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        p, _, fn = line.partition(":")
        entries.append((p.strip().replace(os.sep, "/"), fn.strip() or None))
    return entries


def _allowed(imp: Import, allow: list[tuple[str, str | None]]) -> bool:
    for path, fn in allow:
        if not (imp.file == path or imp.file.endswith("/" + path.lstrip("/"))):
            continue
        if fn is None or fn == imp.function or (imp.function or "").split(".")[-1] == fn \
                or (imp.function or "").startswith(fn + "."):
            return True
    return False


def _private_modules(imports: list[Import]) -> list[dict]:
    """Imports of private modules (``ops/_triton.py``), and whether the importer sits in the same subpackage."""
    out = []
    for i in imports:
        parent = _private_module_parent(i.target)
        if parent is not None:
            same_subpackage = i.importer.startswith(parent + ".") or i.importer == parent
            out.append({"where": i.where(), "importer": i.importer, "target": i.target,
                        "same_subpackage": same_subpackage})
    return out


def _upward_imports(imports: list[Import], root: str) -> tuple[list[dict], list[str]]:
    """Imports from a lower layer of :data:`LAYERS` into a higher one; the units the table does not name."""
    upward, unlayered = [], set()
    for i in imports:
        a, b = _unit(i.importer, root), _unit(i.target, root)
        la, lb = _layer_of(a), _layer_of(b)
        unlayered.update(u for u, lu in ((a, la), (b, lb)) if lu is None)
        if la is not None and lb is not None and la < lb:
            upward.append({"where": i.where(), "importer": i.importer, "target": i.target, "from": a, "to": b,
                           "function": i.function, "type_checking": i.type_checking})
    return upward, sorted(unlayered)


def collect(src: str | os.PathLike = DEFAULT_SRC, allow: str | os.PathLike | None = DEFAULT_ALLOW) -> dict:
    """All the numbers of the report, as a JSON-ready dict."""
    src = Path(src)
    root, modules = discover(src)
    imports: list[Import] = []
    importlib_uses: list[dict] = []
    private_names: list[dict] = []
    functions: list[dict] = []
    long_files: list[dict] = []
    patterns = {f: re.compile(p, re.IGNORECASE) for f, p in FAMILIES.items()}
    families: dict[str, dict[str, list[str]]] = {f: {} for f in FAMILIES}
    for mod in modules.values():
        if mod.tree is None:
            continue
        v = _ImportVisitor(mod, root, modules)
        v.visit(mod.tree)
        imports += v.imports
        importlib_uses += v.importlib_uses
        private_names += v.private_names
        functions += _functions(mod)
        n_lines = len(mod.text.splitlines())
        if n_lines > LONG_FILE_LINES:
            long_files.append({"file": mod.rel, "lines": n_lines})
        rel_in_pkg = mod.path.resolve().relative_to(src.resolve()).as_posix()
        for fam, toks in _family_hits(mod, patterns).items():
            if rel_in_pkg != FAMILY_DECLARATION.format(name=fam):
                families[fam][mod.rel] = toks

    allow_entries = load_allowlist(Path(allow) if allow else None)
    function_imports = [
        {"where": i.where(), "function": i.function, "target": i.target, "allowed": _allowed(i, allow_entries)}
        for i in imports if i.function and not i.type_checking and i.kind != "dynamic"
    ]
    root_imports = [
        {"where": i.where(), "target": i.target, "names": i.names, "function": i.function,
         "why": "binds the root (import pkg.sub without as)" if i.binds_root and i.target != root else "root"}
        for i in imports if i.importer != root and (i.target == root or i.binds_root)
    ]
    layers, unlayered = _upward_imports(imports, root)
    functions.sort(key=lambda f: -f["lines"])
    report = {
        "package": root,
        "src": str(src),
        "modules": sum(1 for m in modules.values() if m.tree is not None),
        "lines": sum(len(m.text.splitlines()) for m in modules.values() if m.tree is not None),
        "cycles_explicit": _cycles(imports, modules, implicit=False),
        "cycles_implicit": _cycles(imports, modules, implicit=True),
        "function_level_imports": function_imports,
        "root_imports": root_imports,
        "private_names": private_names,
        "private_modules": _private_modules(imports),
        "importlib_uses": importlib_uses,
        "functions_over": {str(n): [f for f in functions if f["lines"] > n] for n in LONG_FUNCTION_LINES},
        "files_over": sorted(long_files, key=lambda f: -f["lines"]),
        "families": {f: dict(sorted(files.items())) for f, files in families.items()},
        "upward_imports": layers,
        "unlayered_units": unlayered,
        "unresolved_imports": [{"where": i.where(), "target": i.target} for i in imports if not i.known],
        "unparsed_files": [{"file": m.rel, "error": m.text} for m in modules.values()
                           if m.tree is None and not m.path.is_dir()],
    }
    return report


def violations(report: dict) -> list[str]:
    """The lines ``--check`` fails on (empty when the tree is clean)."""
    out = [f"cannot parse: {u['file']}: {u['error']}" for u in report["unparsed_files"]]
    for comp in report["cycles_explicit"]["sccs"]:
        out.append(f"import cycle ({len(comp['modules'])} modules): {', '.join(comp['modules'])}")
        out += [f"    {e}" for e in comp["edges"]]
    for p in report["private_names"]:
        out.append(f"private name imported across modules: {p['file']}:{p['line']} imports {p['name']} from "
                   f"{p['source']}")
    for p in report["private_modules"]:
        if not p["same_subpackage"]:
            out.append(f"private module imported from outside its subpackage: {p['where']} -> {p['target']}")
    for u in report["importlib_uses"]:
        if not u["metadata_only"]:
            out.append(f"importlib use: {u['file']}:{u['line']} {u['what']}")
    for r in report["root_imports"]:
        out.append(f"package-root import: {r['where']} -> {r['target']} ({r['why']})")
    for u in report["upward_imports"]:
        tc = " (TYPE_CHECKING)" if u["type_checking"] else ""
        out.append(f"upward import: {u['where']} {u['from']} -> {u['to']} ({u['importer']} -> {u['target']}){tc}")
    for f in report["function_level_imports"]:
        if not f["allowed"]:
            out.append(f"function-level own import: {f['where']} in {f['function']} -> {f['target']}")
    return out


def check(src: str | os.PathLike = DEFAULT_SRC, allow: str | os.PathLike | None = DEFAULT_ALLOW) -> list[str]:
    """The violations of the tree at ``src`` (see :func:`violations`)."""
    return violations(collect(src, allow))


# ----------------------------------------------------------------------------------------------------------- text
def render(report: dict, top: int = 25) -> str:
    """The report as text: sections 1 to 9, then the summary line."""
    lines = [f"structure of {report['package']} ({report['src']}): {report['modules']} modules, "
             f"{report['lines']} lines"]
    _render_imports(report, lines.append)
    _render_sizes(report, lines.append, top)
    for u in report["unparsed_files"]:
        lines.append(f"cannot parse: {u['file']}: {u['error']}")
    lines.append("\nsummary: " + ", ".join(f"{k}={v}" for k, v in summary(report).items()))
    return "\n".join(lines)


def _render_imports(report: dict, w) -> None:
    """Sections 1 to 5 (imports)."""

    def cycles(title: str, c: dict) -> None:
        w(f"  {title}: {c['modules_in_cycles']} modules in {len(c['sccs'])} cycles (SCCs of size > 1)")
        for comp in c["sccs"]:
            w(f"    SCC of {len(comp['modules'])}: {', '.join(comp['modules'])}")
            for e in comp["edges"]:
                w(f"        {e}")

    w("\n1. import cycles")
    cycles("explicit imports only", report["cycles_explicit"])
    cycles("with implied package __init__ imports", report["cycles_implicit"])

    fl = report["function_level_imports"]
    w(f"\n2. own-module imports inside functions: {len(fl)} ({sum(not f['allowed'] for f in fl)} not allowlisted)")
    for f in fl:
        w(f"    {f['where']} [{f['function']}] -> {f['target']}{'  (allowed)' if f['allowed'] else ''}")

    w(f"\n3. package-root imports from inside the package: {len(report['root_imports'])}")
    for r in report["root_imports"]:
        where = f" in {r['function']}" if r["function"] else ""
        w(f"    {r['where']} -> {r['target']} {r['names'] or ''} ({r['why']}){where}")

    pn, pm = report["private_names"], report["private_modules"]
    w(f"\n4. private names imported across modules: {len(pn)}")
    for p in pn:
        tc = " (TYPE_CHECKING)" if p["type_checking"] else ""
        w(f"    {p['file']}:{p['line']} {p['name']} from {p['source']}{tc}")
    w(f"   private modules imported: {len(pm)} ({sum(not p['same_subpackage'] for p in pm)} from outside their "
      "subpackage)")
    for p in pm:
        w(f"    {p['where']} -> {p['target']}{'' if p['same_subpackage'] else '  (outside its subpackage)'}")

    iu = report["importlib_uses"]
    w(f"\n5. importlib / __import__ uses: {len(iu)} ({sum(not u['metadata_only'] for u in iu)} not importlib.metadata)")
    for u in iu:
        w(f"    {u['file']}:{u['line']} {u['what']}{'  (metadata)' if u['metadata_only'] else ''}")


def _render_sizes(report: dict, w, top: int) -> None:
    """Sections 6 to 9 (sizes, families, layers)."""
    w("\n6. long functions (decorators included)")
    for n in LONG_FUNCTION_LINES:
        fs = report["functions_over"][str(n)]
        w(f"  over {n} lines: {len(fs)}")
    for f in report["functions_over"][str(LONG_FUNCTION_LINES[-1])][:top]:
        w(f"    {f['lines']:5d}  {f['file']}:{f['line']} {f['function']}")

    w(f"\n7. files over {LONG_FILE_LINES} lines: {len(report['files_over'])}")
    for f in report["files_over"]:
        w(f"    {f['lines']:5d}  {f['file']}")

    w("\n8. files naming each family (outside families/<name>.py)")
    for fam, files in report["families"].items():
        w(f"  {fam}: {len(files)} files")
        for path, toks in files.items():
            sample = ", ".join(sorted(set(toks))[:4])
            w(f"    {path} ({len(toks)}: {sample}{', ...' if len(set(toks)) > 4 else ''})")

    up = report["upward_imports"]
    w(f"\n9. upward imports (layers, lowest first: {' < '.join('/'.join(u) for u in LAYERS)}): {len(up)}")
    for u in up:
        tags = (" [in function]" if u["function"] else "") + (" (TYPE_CHECKING)" if u["type_checking"] else "")
        w(f"    {u['where']} {u['from']} -> {u['to']}: {u['importer']} -> {u['target']}{tags}")
    if report["unlayered_units"]:
        w(f"   units not in the layer table: {', '.join(report['unlayered_units'])}")
    if report["unresolved_imports"]:
        w(f"\nunresolved own imports: {len(report['unresolved_imports'])}")
        for u in report["unresolved_imports"]:
            w(f"    {u['where']} -> {u['target']}")


def summary(report: dict) -> dict[str, int]:
    """The key numbers, one line."""
    return {
        "modules_in_cycles_explicit": report["cycles_explicit"]["modules_in_cycles"],
        "modules_in_cycles_implicit": report["cycles_implicit"]["modules_in_cycles"],
        "function_level_own_imports": len(report["function_level_imports"]),
        "root_imports": len(report["root_imports"]),
        "private_names_imported": len(report["private_names"]),
        "private_module_imports": len(report["private_modules"]),
        "importlib_uses": len(report["importlib_uses"]),
        "importlib_uses_not_metadata": sum(not u["metadata_only"] for u in report["importlib_uses"]),
        **{f"functions_over_{n}": len(report["functions_over"][str(n)]) for n in LONG_FUNCTION_LINES},
        f"files_over_{LONG_FILE_LINES}": len(report["files_over"]),
        **{f"family_{f}_files": len(files) for f, files in report["families"].items()},
        "upward_imports": len(report["upward_imports"]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", default=str(DEFAULT_SRC), help="the package folder (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--check", action="store_true", help="exit 1 and print the violations if there are any")
    parser.add_argument("--allow", default=str(DEFAULT_ALLOW), help="allowlist of function-level own imports")
    parser.add_argument("--top", type=int, default=25, help="rows of the long-function list (default: %(default)s)")
    args = parser.parse_args(argv)
    report = collect(args.src, args.allow)
    if args.check:
        bad = violations(report)
        for line in bad:
            print(line)
        print(f"{len([b for b in bad if not b.startswith('    ')])} structure violations" if bad
              else "structure check: clean")
        return 1 if bad else 0
    if args.json:
        report["summary"] = summary(report)
        print(json.dumps(report, indent=1))
    else:
        print(render(report, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
