"""Cut any classifier into a chain of named blocks and a head, with ``torch.fx``.

A model can be cut after module ``M`` when, in its forward, the only value computed before ``M``
returns that is still needed afterwards is ``M``'s output (parameters and constants do not count:
they are copied where they are used). Blocks are then the named modules themselves (torchvision's
own ``features.3``, ``encoder.layers.encoder_layer_5``); code between blocks (a flatten, a class
token, a positional embedding) goes with the block that follows it, code before the first block
becomes a ``"stem"`` block, and code after the last block is the head.

Only the model's forward *outside* the blocks is traced: a block's own forward may hold Python
control flow that ``torch.fx`` cannot trace. The trace runs in eval mode, so ``if self.training``
branches of that outer forward are fixed to inference.

:func:`find_blocks` finds a block sequence by itself: it expands the model top-down into children
for as long as a module is a chain of its children (and, for a module class other than the plain
containers, every instance of that class is), stopping at modules whose children are all plain
layers, then keeps the expanded modules whose output is still a feature map or a token sequence
(rank 3 or more); what follows the last of them is the head.
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Iterable, Iterator, Optional, Sequence

import torch
from torch import fx, nn

__all__ = ["CutError", "cut_model", "find_blocks"]

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


class CutError(ValueError):
    """A model that cannot be cut as asked; the message says why and what to pass instead."""


class _Tracer(fx.Tracer):
    """Traces a forward, keeping the named modules (and torch.nn's own layers) as single calls."""

    def __init__(self, leaves: Iterable[str]) -> None:
        super().__init__()
        self.leaves = set(leaves)
        # Modules that hold a named block are traced through, even torch.nn's own (nn.TransformerEncoder).
        self.holders = {".".join(n.split(".")[:i]) for n in self.leaves for i in range(1, n.count(".") + 1)}

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaves:
            return True
        if module_qualified_name in self.holders:
            return False
        return super().is_leaf_module(m, module_qualified_name)


@contextlib.contextmanager
def _eval(module: nn.Module) -> Iterator[None]:
    saved = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, mode in saved:
            m.training = mode


class _Untraceable(Exception):
    """``torch.fx`` failed; ``where`` is the innermost module it was tracing ('' for the top)."""

    def __init__(self, reason: str, where: str, kind: str) -> None:
        super().__init__(reason)
        self.reason, self.where, self.kind = reason, where, kind


def _trace(module: nn.Module, leaves: Iterable[str]) -> fx.Graph:
    """The forward's graph with ``leaves`` as single calls; extra arguments fixed to their defaults.

    Raises:
        _Untraceable: with the innermost module being traced when it failed.
    """
    params = list(inspect.signature(module.forward).parameters.values())[1:]
    concrete = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
    tracer = _Tracer(leaves)
    try:
        with _eval(module):
            return tracer.trace(module, concrete_args=concrete or None)
    except Exception as exc:  # noqa: BLE001 - any failure of the trace is reported the same way
        stack = [v for v in tracer.module_stack.values() if v[0]]  # fx leaves the failing calls on its stack
        where, kind = stack[-1] if stack else ("", type(module))
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise _Untraceable(reason, where, getattr(kind, "__name__", str(kind))) from None


class _Graph:
    """A traced forward with what cutting needs: node order and which nodes depend on the input."""

    def __init__(self, graph: fx.Graph) -> None:
        self.graph = graph
        self.nodes = list(graph.nodes)
        self.pos = {n: i for i, n in enumerate(self.nodes)}
        self.inputs = [n for n in self.nodes if n.op == "placeholder" and not n.args]
        self.dynamic: set[fx.Node] = set()
        for n in self.nodes:
            if n.op == "placeholder" or any(a in self.dynamic for a in n.all_input_nodes):
                self.dynamic.add(n)
        self.output = next(n for n in self.nodes if n.op == "output")

    def crossing(self, cut: fx.Node) -> list[fx.Node]:
        """Input-dependent values computed up to ``cut`` and used after it."""
        i = self.pos[cut]
        return [n for n in self.nodes[: i + 1]
                if n in self.dynamic and any(self.pos[u] > i for u in n.users)]

    def between(self, after: Optional[fx.Node], upto: fx.Node) -> list[fx.Node]:
        """Input-dependent nodes after ``after`` (exclusive; the input when None) up to ``upto``."""
        lo = self.pos[after] if after is not None else -1
        return [n for n in self.nodes[lo + 1: self.pos[upto] + 1]
                if n in self.dynamic and n.op not in ("placeholder", "output")]


def _describe(node: fx.Node) -> str:
    if node.op == "placeholder":
        return f"the input {node.target!r}"
    if node.op == "call_module":
        return f"the output of {node.target!r}"
    target = getattr(node.target, "__name__", node.target)
    return f"{target!r} ({node.op} {node.name!r})"


def _piece(root: nn.Module, g: _Graph, region: list[fx.Node], inp: fx.Node, out: fx.Node,
           class_name: str, name: str) -> nn.Module:
    """The nodes of ``region`` as a module ``x -> out``; the named module itself when it is all there is."""
    if (len(region) == 1 and region[0] is out and out.op == "call_module" and out.args == (inp,)
            and not out.kwargs):
        return root.get_submodule(out.target)
    graph = fx.Graph()
    env = {inp: graph.placeholder("x")}
    inside = set(region)

    def arg(a: fx.Node) -> fx.Node:
        if a not in env:
            if a in g.dynamic and a not in inside:
                raise CutError(f"{name!r} needs {_describe(a)}, which is computed before the previous cut; "
                               f"a block must read only the previous block's output")
            env[a] = graph.node_copy(a, arg)  # a parameter, buffer or constant expression: copied where used
        return env[a]

    for n in region:
        env[n] = graph.node_copy(n, arg)
    graph.output(env[out])
    return fx.GraphModule(root, graph, class_name=class_name)


def _module(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        top = ", ".join(n for n, _ in model.named_children())
        raise CutError(f"{type(model).__name__} has no module {name!r} (its top-level modules: {top}); "
                       f"name blocks by their dotted module paths") from None


def cut_model(model: nn.Module, blocks: Optional[Sequence[str]] = None,
              input_size: int = 224) -> tuple[list[tuple[str, nn.Module]], nn.Module]:
    """Cut ``model`` into named blocks and a head that, run in order, give its forward.

    Args:
        model: a classifier whose forward maps images ``[B, 3, S, S]`` to logits ``[B, C]``.
        blocks: dotted names of the modules whose outputs chain, in the order the forward runs
            them; None finds them (:func:`find_blocks`).
        input_size: the input side, for :func:`find_blocks`' probe.

    Returns:
        ``(blocks, head)``: ``(name, module)`` pairs (a ``"stem"`` block first when code runs
        before the first named block) and the head. They share the model's parameters.

    Raises:
        CutError: a name that is not a module, a forward that ``torch.fx`` cannot trace outside the
            blocks, a block that is not called exactly once, or a value that crosses a cut.
    """
    if blocks is None:
        blocks = find_blocks(model, input_size)
    blocks = list(blocks)
    if len(set(blocks)) != len(blocks):
        raise CutError(f"block names repeat: {blocks}")
    for name in blocks:
        _module(model, name)
        outer = next((b for b in blocks if name.startswith(b + ".")), None)
        if outer is not None:
            raise CutError(f"block {name!r} lies inside block {outer!r}; name one or the other")
    kind = type(model).__name__
    try:
        g = _Graph(_trace(model, blocks))
    except _Untraceable as exc:
        if exc.where:
            raise CutError(f"torch.fx cannot trace {exc.where!r} ({exc.kind}.forward: {exc.reason}), which holds "
                           f"blocks {[b for b in blocks if b.startswith(exc.where + '.')]}; blocks themselves are "
                           f"not traced, so name {exc.where!r} as one block instead, or write its forward as a "
                           f"plain loop over its layers") from None
        raise CutError(f"torch.fx cannot trace {kind}.forward outside the blocks ({exc.reason}); blocks "
                       f"themselves are not traced, so name blocks that contain the untraceable code, or "
                       f"make the forward traceable") from None
    if len(g.inputs) != 1:
        raise CutError(f"{kind}.forward takes {len(g.inputs)} inputs without defaults; a backbone takes "
                       f"one image batch")
    calls: dict[str, list[fx.Node]] = {}
    for n in g.nodes:
        if n.op == "call_module":
            calls.setdefault(n.target, []).append(n)
    nodes = []
    for name in blocks:
        found = calls.get(name, [])
        if len(found) != 1:
            why = "never" if not found else f"{len(found)} times"
            raise CutError(f"{kind}.forward calls block {name!r} {why}; a block must run exactly once "
                           f"on the way from the input to the logits")
        nodes.append(found[0])
    order = sorted(range(len(nodes)), key=lambda i: g.pos[nodes[i]])
    if order != list(range(len(nodes))):
        raise CutError(f"blocks must be named in the order the forward runs them: "
                       f"{[blocks[i] for i in order]}")
    for name, node in zip(blocks, nodes):
        other = [n for n in g.crossing(node) if n is not node]
        if other:
            holder = name.rpartition(".")[0]
            raise CutError(f"cannot cut {kind} after {name!r}: {_describe(other[0])} is computed before it "
                           f"and used after it (a skip connection across the cut); leave {name!r} out of the "
                           f"blocks, or name a block that contains the whole skip"
                           f"{f' (e.g. {holder!r})' if holder else ''}")
    result = g.output.args[0]
    if not isinstance(result, fx.Node):
        raise CutError(f"{kind}.forward returns a {type(result).__name__}, not one logits tensor; "
                       f"wrap the model so that its forward returns the logits")
    if result is nodes[-1] or result not in g.dynamic:
        raise CutError(f"nothing follows the last block {blocks[-1]!r}: its output is the model's "
                       f"output; the head must not be a block, name the blocks before the classifier")

    pieces: list[tuple[str, nn.Module]] = []
    x = g.inputs[0]
    first = [a for a in nodes[0].all_input_nodes if a in g.dynamic]
    if len(first) != 1:
        raise CutError(f"block {blocks[0]!r} takes {len(first)} input-dependent values; a block takes one")
    if first[0] is not x:  # code runs before the first block: the stem
        if [n for n in g.crossing(first[0]) if n is not first[0]]:
            raise CutError(f"the code before block {blocks[0]!r} leaves more than one value for later; "
                           f"name an earlier first block")
        stem_name = "stem" if "stem" not in blocks else "input"
        pieces.append((stem_name, _piece(model, g, g.between(None, first[0]), x, first[0], "Stem", stem_name)))
        x = first[0]
    for name, node in zip(blocks, nodes):
        region = g.between(None if x.op == "placeholder" else x, node)
        pieces.append((name, _piece(model, g, region, x, node, "Block", name)))
        x = node
    head = _piece(model, g, g.between(x, result), x, result, "Head", "the head")
    return pieces, head


# ------------------------------------------------------------------------------------ finding blocks
def _chain(module: nn.Module) -> tuple[Optional[list[str]], str]:
    """The direct children ``module``'s forward runs as a chain, in order; or None and why not."""
    children = dict(module.named_children())
    if not children:
        return None, "it has no sub-modules"
    try:
        g = _Graph(_trace(module, children))
    except _Untraceable as exc:
        return None, f"torch.fx cannot trace its forward ({exc.reason})"
    if len(g.inputs) != 1:
        return None, "its forward takes more than one input"
    calls = [n for n in g.nodes if n.op == "call_module"]
    targets = [n.target for n in calls]
    if not calls or any(t not in children for t in targets) or len(set(targets)) != len(targets):
        return None, "its forward does not call each of its sub-modules once"
    for n in calls:  # cuts matter only after children that can be blocks; plain layers become glue
        if _substantial(children[n.target]) and [c for c in g.crossing(n) if c is not n]:
            return None, f"a value crosses the cut after {n.target!r} (a skip connection)"
    return targets, ""


def _substantial(m: nn.Module) -> bool:
    """A module made of modules and holding weights: a candidate block rather than a plain layer."""
    return any(True for _ in m.children()) and any(True for _ in m.parameters())


def find_blocks(model: nn.Module, input_size: int = 224) -> list[str]:
    """Find ``model``'s block sequence by tracing (see the module docstring).

    Args:
        model: the classifier.
        input_size: side of the probe input that tells feature maps from pooled vectors.

    Raises:
        CutError: the model is not a chain of its children, or fewer than two blocks were found.
    """
    kind = type(model).__name__
    order, why = _chain(model)
    if order is None:
        raise CutError(f"cannot find blocks in {kind}: {why}; pass blocks=[...], the dotted names of the "
                       f"modules whose outputs chain (e.g. 'features.3')")
    by_class: dict[type, bool] = {}

    def expandable(m: nn.Module) -> Optional[list[str]]:
        if not any(_substantial(c) for c in m.children()):
            return None  # plain layers: m is the block
        if type(m) not in _CONTAINERS:
            cls = type(m)
            if cls not in by_class:  # one rule per class: all of its instances are chains, or none is cut
                by_class[cls] = all(_chain(i)[0] is not None for i in model.modules() if type(i) is cls)
            if not by_class[cls]:
                return None
        return _chain(m)[0]

    def expand(prefix: str, m: nn.Module, children: Optional[list[str]]) -> list[str]:
        if children is None:
            return [prefix]
        names = []
        for c in children:
            sub = m.get_submodule(c)
            names += expand(f"{prefix}.{c}" if prefix else c, sub, expandable(sub))
        return names

    leaves = expand("", model, order)
    candidates = [n for n in leaves if any(True for _ in model.get_submodule(n).children())]
    ranks: dict[str, int] = {}

    def record(name: str):
        def hook(_m: nn.Module, _inputs: tuple, out: object) -> None:
            ranks.setdefault(name, out.dim() if isinstance(out, torch.Tensor) else 0)
        return hook

    hooks = [model.get_submodule(n).register_forward_hook(record(n)) for n in candidates]
    try:
        with _eval(model), torch.no_grad():
            model(torch.zeros(1, 3, input_size, input_size))
    except Exception as exc:  # noqa: BLE001
        raise CutError(f"{kind} does not run on a {input_size}x{input_size} input: "
                       f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    finally:
        for h in hooks:
            h.remove()
    blocks = []
    for n in candidates:
        if ranks.get(n, 0) < 3:
            break  # a pooled vector: from here on it is the head
        blocks.append(n)
    if len(blocks) < 2:
        raise CutError(f"found {len(blocks)} block(s) in {kind} ({', '.join(blocks) or 'none'}); exits need at "
                       f"least two: pass blocks=[...], the dotted names of the modules whose outputs chain")
    return blocks
