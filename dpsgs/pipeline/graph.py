"""ModelGraph: any nn.Module traced into a sequence of operations, each tagged with the module
that ran it, with the values that would cross a cut before any module.

torch.fx traces the user's `forward` (torch.nn's own layers stay whole, as fx's default
leaves; the user's modules are traced through), so functional ops, skip connections and
reshapes between layers are part of the graph, never dropped. A user's module whose forward
cannot be traced (data-dependent control flow) runs whole, as one operation, exactly as
written: no cut falls inside it. Only the model's own forward must be traceable. One shape-propagation pass
on a few real samples (eval mode, no gradient: no running statistic or random state moves)
records every value: a tensor's dtype and per-sample shape, or its Python type, and the
forward FLOPs of every operation (the deterministic cost the balancer uses).

A cut is named by a module path ('layer3.1', 'layer3.1.conv2'): the stage boundary falls
before the first operation that module runs. Everything defined before the cut and used
after it crosses it; `why_not` says why a cut is impossible (a non-tensor value or a tensor
without a batch dimension would cross, a module with parameters or buffers is used on both
sides, ...). What cannot be traced, or whose output is not one tensor of logits, is refused
with a one-line SplitError naming the module and the reason; the model is never altered.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from dpsgs.comm.protocol import MAX_MESSAGE_TENSORS

__all__ = ["ModelGraph", "SplitError", "Value"]


class SplitError(ValueError):
    """A model dpsgs cannot trace or cut as asked (one line: the module and the reason)."""


@dataclass
class Value:
    """What one node of the graph produced on the sample batch."""

    kind: str                              # 'tensor' or the Python type's name
    dtype: torch.dtype | None = None
    shape: tuple[int, ...] | None = None   # per sample (None: no batch dimension)
    full_shape: tuple[int, ...] = ()       # on the 2-row sample batch
    flops: float = 0.0                     # forward FLOPs per sample (matmuls, convolutions)
    elements: float = 0.0                  # elements written per sample (memory-bound ops)
    norm: bool = False                     # made by a normalisation (BatchNorm, LayerNorm...)

    @property
    def batched(self) -> bool:
        return self.kind == "tensor" and self.shape is not None


class _Tracer(fx.Tracer):
    """fx's default leaves (torch.nn's layers) and the modules in `whole`; remembers the
    innermost module whose forward failed to trace."""

    def __init__(self, whole: set[str]) -> None:
        super().__init__()
        self.whole = whole
        self.failed_in: str | None = None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname in self.whole or super().is_leaf_module(m, qualname)

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = self.path_of_module(m)
            raise


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


@dataclass
class ModelGraph:
    """The traced graph of `model` with every value measured on `sample` (see the module
    docstring). `body` lists the operations in execution order (no inputs, output or
    parameter reads); a cut at position p (0 < p < len(body)) falls before body[p]."""

    model: nn.Module
    gm: fx.GraphModule
    body: list[fx.Node]
    input: fx.Node
    output: fx.Node                         # the node whose value is the logits
    values: dict[fx.Node, Value]
    where: dict[fx.Node, str]               # node -> innermost module path ('' = the root)
    starts: dict[str, int] = field(default_factory=dict)   # module path -> its first position
    names: dict[int, str] = field(default_factory=dict)    # position -> canonical module path
    label: str = ""                         # what errors call the model (default: its class)
    whole: list[str] = field(default_factory=list)   # modules run untraced (see _trace)
    _last: dict[fx.Node, int] | None = field(default=None, repr=False)   # see _last_use
    _spans: list[Any] | None = field(default=None, repr=False)          # see _shared_across

    @property
    def cls(self) -> str:
        return self.label or type(self.model).__name__

    # -- building ------------------------------------------------------------------------
    @classmethod
    def trace(cls, model: nn.Module, sample: torch.Tensor, label: str = "") -> "ModelGraph":
        """Trace `model` and measure it on `sample` (a few rows of real inputs, batch >= 2);
        SplitError when it cannot be traced or its output is not one tensor of logits.
        `label` names the model in errors (default: its class)."""
        label = label or type(model).__name__
        gm, whole = _trace(model, model.training, label)
        _check_mode_independent(model, gm, label, whole)
        nodes = list(gm.graph.nodes)
        inputs = [n for n in nodes if n.op == "placeholder"]
        out = next(n for n in nodes if n.op == "output")
        logits = out.args[0]
        if not isinstance(logits, fx.Node):
            raise SplitError(f"cannot split {label}: its forward returns "
                             f"{type(logits).__name__}, not one tensor of logits")
        body = [n for n in nodes if n.op in ("call_module", "call_function", "call_method")]
        where = {n: _module_of(n) for n in body}
        g = cls(model, gm, body, inputs[0], logits, {}, where, label=label, whole=whole)
        g.values = _propagate(gm, model, sample, g)
        v = g.values[logits]
        if not v.batched or v.dtype is None or not v.dtype.is_floating_point or len(v.shape) != 1:
            what = (f"a {v.kind}" if v.kind != "tensor" else
                    f"a tensor of shape {_shape_text(v)} and dtype {v.dtype}")
            raise SplitError(f"cannot split {g.cls}: its forward returns {what}; dpsgs needs "
                             f"the logits, one floating tensor of shape (batch, classes)")
        g._index_modules()
        return g

    def _index_modules(self) -> None:
        for i, n in enumerate(self.body):
            path = self.where[n]
            parts = path.split(".") if path else []
            for d in range(1, len(parts) + 1):
                self.starts.setdefault(".".join(parts[:d]), i)
        for path, i in sorted(self.starts.items(), key=lambda kv: (kv[1], kv[0].count("."))):
            if i > 0:
                self.names.setdefault(i, path)   # the outermost module starting there

    # -- cuts ----------------------------------------------------------------------------
    def position(self, point: int | str) -> int:
        """The body position of split point `point`: a module path, or an int (the index of
        a top-level child, in named_children order: the layer index of an nn.Sequential)."""
        path = self._path(point)
        if path not in self.starts:
            if path in dict(self.model.named_modules()):
                raise SplitError(f"cannot split {self.cls} before '{path}': its forward never "
                                 f"runs that module")
            raise SplitError(f"cannot split {self.cls} before '{path}': no such module "
                             f"(top-level modules: {', '.join(self._top()) or 'none'})")
        return self.starts[path]

    def _path(self, point: int | str) -> str:
        children = [n for n, _ in self.model.named_children()]
        if isinstance(point, int) or (isinstance(point, str) and point.isdigit()
                                      and point not in self.starts):
            i = int(point)
            if not 0 <= i < len(children):
                raise SplitError(f"cannot split {self.cls} before top-level module {i}: it "
                                 f"has {len(children)} ({', '.join(children)})")
            return children[i]
        return str(point)

    def _top(self) -> list[str]:
        return [n for n, _ in self.model.named_children()]

    def name(self, position: int) -> str:
        return self.names.get(position, f"operation {self.body[position].name}")

    def live(self, position: int) -> list[fx.Node]:
        """The values that cross a cut at `position`, in the order they were made: defined
        before it (the input, operations) and used at or after it (parameter reads are not
        values: each stage reads its own)."""
        last = self._last_use()
        return [v for v in [self.input, *self.body[:position]] if last[v] >= position]

    def _last_use(self) -> dict[fx.Node, int]:
        """Value -> the position of its last user (len(body): the output)."""
        if self._last is None:
            index = {n: i for i, n in enumerate(self.body)}
            end = len(self.body)
            self._last = {v: max((index.get(u, end) for u in v.users), default=-1)
                          for v in [self.input, *self.body]}
        return self._last

    def why_not(self, position: int) -> str | None:
        """None when a cut at `position` is possible; else the reason, naming what."""
        if not 0 < position < len(self.body):
            return "it leaves a stage without any operation"
        live = self.live(position)
        for v in live:
            val = self.values[v]
            made = self._maker(v)
            if val.kind != "tensor":
                return (f"the value '{v.name}' (a {val.kind}, made by {made}) would have to "
                        f"cross it, and only tensors can")
            if not val.batched:
                return (f"the tensor '{v.name}' of shape {_shape_text(val)} (made by {made}) "
                        f"would have to cross it, and it has no batch dimension")
        if len(live) > MAX_MESSAGE_TENSORS:
            return (f"{len(live)} tensors would cross it (at most {MAX_MESSAGE_TENSORS} per "
                    f"message): {', '.join(v.name for v in live)}")
        if not any(self.values[v].dtype.is_floating_point for v in live):
            return "no floating-point tensor crosses it, so no gradient could flow back"
        shared = self._shared_across(position)
        if shared:
            return (f"{shared} is used on both sides of it (parameters and buffers live in "
                    f"one stage)")
        return None

    def check(self, position: int, label: str | None = None) -> None:
        """SplitError naming the cut when it is impossible."""
        why = self.why_not(position)
        if why:
            raise SplitError(f"cannot split {self.cls} before '{label or self.name(position)}': "
                             f"{why}")

    def candidates(self) -> list[int]:
        """Every position before a module where a cut is possible, in order."""
        return [p for p in sorted(self.names) if self.why_not(p) is None]

    def specs(self, position: int) -> list[tuple[torch.dtype, tuple[int, ...]]]:
        """(dtype, per-sample shape) of every tensor crossing a cut at `position`."""
        return [(self.values[v].dtype, self.values[v].shape) for v in self.live(position)]

    def _maker(self, v: fx.Node) -> str:
        if v is self.input:
            return "the batch"
        path = self.where.get(v, "")
        return f"module '{path}'" if path else f"{self.cls}.forward"

    def _shared_across(self, position: int) -> str | None:
        """A module or tensor with state (parameters, buffers) used both before and after
        `position`, named; None if there is none."""
        if self._spans is None:
            spans: dict[int, list[Any]] = {}       # state id -> [first, last, label]
            for i, n in enumerate(self.body):
                for key, label in self._state_of(n):
                    spans.setdefault(key, [i, i, label])[1] = i
            self._spans = sorted(spans.values())
        return next((label for first, last, label in self._spans if first < position <= last),
                    None)

    def _state_of(self, n: fx.Node) -> list[tuple[int, str]]:
        """(id, name) of the parameters and buffers node `n` uses."""
        out = []
        if n.op == "call_module":
            m = self.model.get_submodule(n.target)
            for name, t in [*m.named_parameters(), *m.named_buffers()]:
                out.append((id(t), f"module '{n.target}'"))
        for a in n.all_input_nodes:
            if a.op == "get_attr":
                t = _get_attr(self.model, a.target)
                if isinstance(t, torch.Tensor):
                    out.append((id(t), f"'{a.target}'"))
        return out


# ---------------------------------------------------------------------------- tracing

def _trace(model: nn.Module, training: bool, name: str,
           whole: set[str] | None = None) -> tuple[fx.GraphModule, list[str]]:
    """fx-trace `model` in train or eval mode (each module's flag restored after). A
    submodule whose forward cannot be traced (data-dependent control flow) runs whole, as
    one operation of the graph, and the trace is retried; the paths of those modules come
    back with the graph. What fails in the model's own forward is refused."""
    params = list(inspect.signature(model.forward).parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p.name for p in positional if p.default is p.empty]
    if len(required) != 1 or any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
        raise SplitError(f"cannot split {name}: its forward takes ({', '.join(p.name for p in params)}); "
                         f"dpsgs feeds it one batch tensor")
    concrete = {p.name: p.default for p in params if p.default is not p.empty}
    modes = {m: m.training for m in model.modules()}
    whole = set(whole or ())
    try:
        model.train(training)
        while True:
            tracer = _Tracer(whole)
            try:
                graph = tracer.trace(model, concrete_args=concrete or None)
                break
            except Exception as e:  # noqa: BLE001 - any tracing failure: run whole, or refuse
                if tracer.failed_in and tracer.failed_in not in whole:
                    whole.add(tracer.failed_in)
                    continue
                raise SplitError(f"cannot split {name} into stages: {name}.forward cannot be "
                                 f"traced: {_first_line(e)} (a model cut into stages needs a "
                                 f"forward without data-dependent control flow; --stages 1 "
                                 f"runs any model)") from None
    finally:
        for m, mode in modes.items():
            m.training = mode
    _drop_defaults(graph)
    return fx.GraphModule(model, graph, class_name=name), sorted(whole)


def _drop_defaults(graph: fx.Graph) -> None:
    """Remove the placeholders fx made for the arguments left at their defaults (concrete
    args) and the checks it guards them with: the stages see only the batch."""
    extra = [n for n in graph.nodes if n.op == "placeholder"][1:]
    doomed: list[fx.Node] = []
    todo = list(extra)
    while todo:
        n = todo.pop()
        if n not in doomed:
            doomed.append(n)
            todo.extend(n.users)
    order = {n: i for i, n in enumerate(graph.nodes)}
    for n in sorted(doomed, key=order.__getitem__, reverse=True):
        graph.erase_node(n)


def _check_mode_independent(model: nn.Module, gm: fx.GraphModule, name: str,
                            whole: list[str]) -> None:
    """Refuse a forward that reads self.training outside torch.nn's layers (e.g.
    F.dropout(x, p, self.training)): the traced graph would keep train mode's constants in
    evaluation."""
    other, _ = _trace(model, not model.training, name, set(whole))
    a, b = list(gm.graph.nodes), list(other.graph.nodes)
    for x, y in zip(a, b):
        if _sig(x) != _sig(y):
            path = _module_of(x)
            where = f"module '{path}'" if path else "its forward"
            raise SplitError(f"cannot split {name}: {where} reads self.training outside "
                             f"torch.nn's layers ({x.name}); use the layer (nn.Dropout, ...) "
                             f"so that evaluation runs in eval mode")
    if len(a) != len(b):
        raise SplitError(f"cannot split {name}: its forward runs other operations in eval "
                         f"mode than in train mode (self.training)")


def _sig(n: fx.Node) -> tuple[Any, ...]:
    return (n.op, str(n.target), repr(n.args), repr(n.kwargs))


def _module_of(n: fx.Node) -> str:
    if n.op == "call_module":
        return str(n.target)
    stack = n.meta.get("nn_module_stack") or {}
    return next(reversed(stack)) if stack else ""


def _get_attr(model: nn.Module, target: str) -> Any:
    obj: Any = model
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


# ---------------------------------------------------------------------------- measuring

class _Measure(fx.Interpreter):
    """Runs the graph, recording each node's result."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.results: dict[fx.Node, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        r = super().run_node(n)
        self.results[n] = r
        return r


_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)
_NORM_FUNCTIONS = ("batch_norm", "layer_norm", "group_norm", "instance_norm", "rms_norm")
_MATMULS = ("matmul", "mm", "bmm", "linear", "addmm", "baddbmm")


def _flops(gm: fx.GraphModule, n: fx.Node, r: Any, args: list[Any]) -> float:
    """Forward FLOPs (2 per multiply-add) of node `n` with result `r` and arguments `args`:
    convolutions and matrix products by formula, any other layer with weight matrices as 2 x
    its weights per output position; 0 for the rest (element-wise, costed by elements).
    By hand rather than torch.utils.flop_counter: any dispatch mode imports torch._dynamo,
    seconds of start-up on every rank."""
    if not isinstance(r, torch.Tensor) or r.numel() == 0:
        return 0.0
    if n.op == "call_module":
        m = gm.get_submodule(n.target)
        if isinstance(m, nn.modules.conv._ConvNd):
            per = m.in_channels // m.groups * math.prod(m.kernel_size)
            if m.transposed:               # every input element meets out/groups x kernel
                x = args[0]
                return 2.0 * x.numel() * (m.out_channels // m.groups) * math.prod(m.kernel_size)
            return 2.0 * r.numel() * per
        if isinstance(m, nn.Linear):
            return 2.0 * r.numel() * m.in_features
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag) + _NORMS):
            return 0.0
        weights = sum(p.numel() for p in m.parameters() if p.dim() >= 2)
        return 2.0 * weights * r.numel() / max(1, r.shape[-1]) if weights else 0.0
    name = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", "")
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if name.startswith("conv") and len(tensors) >= 2 and "transpose" not in name:
        return 2.0 * r.numel() * math.prod(tensors[1].shape[1:])
    if name in _MATMULS and tensors:
        k = tensors[1].shape[-1] if name == "linear" and len(tensors) > 1 else tensors[-1].shape[-2] \
            if tensors[-1].dim() >= 2 else tensors[-1].shape[-1]
        return 2.0 * r.numel() * k
    return 0.0


def _is_norm(gm: fx.GraphModule, n: fx.Node) -> bool:
    if n.op == "call_module":
        return isinstance(gm.get_submodule(n.target), _NORMS)
    name = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", "")
    return name in _NORM_FUNCTIONS


def _propagate(gm: fx.GraphModule, model: nn.Module, sample: torch.Tensor,
               g: ModelGraph) -> dict[fx.Node, Value]:
    """Run the graph on batches of 2 and 3 rows of `sample` (eval mode, no gradient): a
    tensor whose first dimension follows the batch is batched (per-sample shape kept)."""
    rows = [sample[torch.arange(b) % sample.shape[0]] for b in (2, 3)]
    modes = {m: m.training for m in model.modules()}
    runs = []
    try:
        model.eval()
        with torch.no_grad():
            for x in rows:
                m = _Measure(gm)
                try:
                    m.run(x)
                except Exception as e:  # noqa: BLE001 - reported with the node that failed
                    raise SplitError(f"cannot split {g.cls}: its traced forward fails on a "
                                     f"sample batch: {_first_line(e)}") from None
                runs.append(m)
    finally:
        for mod, mode in modes.items():
            mod.training = mode
    out: dict[fx.Node, Value] = {}
    for n in [g.input, *g.body]:
        a = runs[0].results[n] if n is not g.input else rows[0]
        b = runs[1].results[n] if n is not g.input else rows[1]
        if not isinstance(a, torch.Tensor):
            out[n] = Value(type(a).__name__)
            continue
        batched = (a.dim() >= 1 and isinstance(b, torch.Tensor) and a.shape[0] == 2
                   and b.shape[0] == 3 and a.shape[1:] == b.shape[1:])
        flops = 0.0 if n is g.input else _flops(gm, n, a, _args(n, runs[0].results, rows[0], g))
        out[n] = Value("tensor", a.dtype, tuple(a.shape[1:]) if batched else None,
                       tuple(a.shape), flops / 2, a.numel() / 2,
                       n is not g.input and _is_norm(gm, n))
    return out


def _args(n: fx.Node, results: dict[fx.Node, Any], x: torch.Tensor, g: ModelGraph) -> list[Any]:
    """The values of `n`'s positional arguments in a run (parameter reads fetched)."""
    def value(a: Any) -> Any:
        if isinstance(a, fx.Node):
            if a is g.input:
                return x
            if a.op == "get_attr":
                return _get_attr(g.model, a.target)
            return results.get(a)
        return a
    return [value(a) for a in n.args]


def _shape_text(v: Value) -> str:
    return str(("batch", *v.shape)) if v.shape is not None else str(v.full_shape)
