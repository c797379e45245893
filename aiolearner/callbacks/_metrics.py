"""Metrics computed on the device: accuracy, the loss, plain functions and torchmetrics.

Per batch, a metric only queues torch ops on the device (a detached value multiplied by the batch
size, added to a running sum): no ``.item()``, no host sync. The sums are turned into Python
floats once per epoch, and once per ``log_every_n_steps`` training steps when asked.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import torch

from aiolearner import Callback, StateView, split_batch

from ._args import ArgumentTypeError, named, optional_whole, shown

if TYPE_CHECKING:
    from torchmetrics import Metric as _TorchMetric

__all__ = ["MetricFn", "Metrics", "accuracy"]

MetricFn = Callable[[Any, Any], torch.Tensor]
"""A metric as a function: ``fn(output, targets) -> scalar tensor`` (the batch's mean)."""


def accuracy(output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The fraction of correct predictions in a batch, as a tensor on the batch's device.

    Class scores ``(N, C, ...)`` with class indices ``(N, ...)``: the arg-max over dimension 1 is
    compared with the targets. Scores of the same shape as the targets (or ``(N, 1)`` against
    ``(N,)``) are read as binary logits: a score above 0 predicts 1.

    Example:
        >>> accuracy(torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0]))
        tensor(0.5000)
    """
    if output.dim() == targets.dim() + 1 and output.shape[1] == 1:
        output = output.squeeze(1)
    if output.shape == targets.shape:
        predicted = output > 0
        return (predicted == (targets > 0.5)).float().mean()
    if output.dim() != targets.dim() + 1:
        raise ValueError(
            f"accuracy: cannot compare outputs of shape {tuple(output.shape)} with targets of"
            f" shape {tuple(targets.shape)}; expected class scores (N, C, ...) and class indices"
            " (N, ...), or binary logits of the targets' shape"
        )
    return (output.argmax(dim=1) == targets).float().mean()


def _batch_size(targets: Any) -> int:
    if isinstance(targets, torch.Tensor) and targets.dim() > 0:
        return int(targets.shape[0])
    return 1


def _is_torchmetric(obj: object) -> bool:
    # Recognised by the class hierarchy's names: aiolearner never imports torchmetrics itself,
    # so it stays an optional dependency that only users of its metrics install.
    for cls in type(obj).__mro__:
        if cls.__name__ == "Metric" and cls.__module__.startswith("torchmetrics"):
            return True
    return False


class _Mean:
    """A sample-weighted running mean kept on the device."""

    __slots__ = ("count", "total")

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None
        self.count = 0

    def add(self, value: torch.Tensor, n: int) -> None:
        value = value.detach().to(torch.float32)
        total = self.total
        # One op per batch: total + n * value (a fresh tensor: never in place on a caller's).
        self.total = value * n if total is None else torch.add(total, value, alpha=n)
        self.count += n

    def value(self) -> float | None:
        if self.total is None or self.count == 0:
            return None
        return float(self.total) / self.count  # the one host sync

    def reset(self) -> None:
        self.total = None
        self.count = 0

    def state(self) -> dict[str, Any]:
        total = None if self.total is None else self.total.detach().cpu()
        return {"total": total, "count": self.count}

    def load(self, state: Mapping[str, Any], device: torch.device | None) -> None:
        total = state.get("total")
        self.total = None if total is None else total.to(device) if device else total
        self.count = int(state.get("count", 0))


class _Tracker:
    """One metric in one phase: an epoch accumulator and, optionally, a window accumulator."""

    def __init__(self, name: str, spec: Any, *, window: bool) -> None:
        self.name = name
        # isinstance first: a torchmetrics Metric overloads == to build a new metric.
        self.is_loss = isinstance(spec, str) and spec == "loss"
        self.fn: MetricFn | None = None
        self.torchmetric: _TorchMetric | None = None
        self.window_metric: _TorchMetric | None = None
        if self.is_loss:
            pass
        elif isinstance(spec, str) and spec == "accuracy":
            self.fn = accuracy
        elif isinstance(spec, str):
            raise TypeError(
                f"metric {name!r}: unknown built-in {spec!r} (built-ins: 'accuracy', 'loss')"
            )
        elif _is_torchmetric(spec):
            self.torchmetric = spec
            # Its states then travel in its state_dict, which our checkpoints use.
            spec.persistent(True)
            if window:
                self.window_metric = copy.deepcopy(spec)
        elif callable(spec):
            self.fn = spec
        else:
            raise TypeError(
                f"metric {name!r}: expected 'loss', 'accuracy', a torchmetrics Metric or a"
                f" function fn(output, targets) -> tensor, got {type(spec).__name__}"
            )
        self.epoch = _Mean()
        self.window = _Mean() if window and self.torchmetric is None else None
        self.device: torch.device | None = None

    def update(self, output: Any, targets: Any, loss: torch.Tensor | None) -> None:
        if isinstance(output, torch.Tensor):
            output = output.detach()
        tm = self.torchmetric
        if tm is not None:
            if self.device is None and isinstance(output, torch.Tensor):
                self.device = output.device
                tm.to(output.device)
                if self.window_metric is not None:
                    self.window_metric.to(output.device)
            tm.update(output, targets)
            if self.window_metric is not None:
                self.window_metric.update(output, targets)
            return
        if self.is_loss:
            if loss is None:
                return
            value = loss
        else:
            assert self.fn is not None
            try:
                value = self.fn(output, targets)
            except Exception as exc:
                exc.add_note(
                    f"aiolearner: raised by metric {self.name!r} (its fn(output, targets))"
                )
                raise
            if not isinstance(value, torch.Tensor):
                value = self._as_tensor(value)
            if value.numel() != 1:
                raise ValueError(
                    f"metric {self.name!r} returned a tensor of shape {tuple(value.shape)}, not "
                    "one number for the batch: reduce it in the function (e.g. .mean())"
                )
        n = _batch_size(targets)
        self.device = value.device
        self.epoch.add(value, n)
        if self.window is not None:
            self.window.add(value, n)

    def _as_tensor(self, value: Any) -> torch.Tensor:
        """A number a metric function returned, as a tensor; what is not one is refused by
        name (torch's own error names neither the metric nor what it returned)."""
        try:
            return torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise TypeError(
                f"metric {self.name!r} returned {value!r} ({type(value).__name__}), not one number"
                " for the batch: return a scalar tensor or a float (e.g. (out.argmax(1) =="
                " y).float().mean())"
            ) from exc

    @staticmethod
    def _computed(metric: _TorchMetric) -> Any:
        value = metric.compute()
        if isinstance(value, torch.Tensor):
            return float(value) if value.numel() == 1 else value.detach().cpu().tolist()
        return value

    def epoch_value(self, group: Any = None) -> Any:
        tm = self.torchmetric
        if tm is not None:
            if group is not None:
                # torchmetrics syncs its states in compute(): on the strategy's lane, not on
                # the group the model's gradients use.
                tm.process_group = group
            return None if tm.update_count == 0 else self._computed(tm)
        return self.epoch.value()

    def window_value(self) -> Any:
        wm = self.window_metric
        if wm is not None:
            if wm.update_count == 0:
                return None
            value = self._computed(wm)
            wm.reset()
            return value
        if self.window is None:
            return None
        value = self.window.value()
        self.window.reset()
        return value

    def reset(self) -> None:
        self.reset_epoch()
        if self.window_metric is not None:
            self.window_metric.reset()
        if self.window is not None:
            self.window.reset()

    def reset_epoch(self) -> None:
        """The epoch's accumulator only: a window of steps goes on across epochs."""
        if self.torchmetric is not None:
            self.torchmetric.reset()
        self.epoch.reset()

    def state(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        tm = self.torchmetric
        if tm is None:
            out["epoch"] = self.epoch.state()
        else:
            out.update(_torchmetric_state(tm))
        # The window of steps in progress (reported every log_every_n_steps steps).
        if self.window is not None:
            out["window"] = self.window.state()
        if self.window_metric is not None:
            out["window_metric"] = _torchmetric_state(self.window_metric)
        return out

    def load(self, state: Mapping[str, Any]) -> None:
        tm = self.torchmetric
        if tm is None:
            self.epoch.load(state.get("epoch", {}), self.device)
        else:
            _load_torchmetric(tm, state)
        if self.window is not None:
            self.window.load(state.get("window", {}), self.device)
        if self.window_metric is not None and "window_metric" in state:
            _load_torchmetric(self.window_metric, state["window_metric"])


def _torchmetric_state(tm: Any) -> dict[str, Any]:
    states = {k: v.detach().cpu() for k, v in tm.state_dict().items()}
    return {"torchmetric": states, "update_count": tm.update_count}


def _load_torchmetric(tm: Any, state: Mapping[str, Any]) -> None:
    tm.load_state_dict(dict(state.get("torchmetric", {})))
    # torchmetrics keeps the update count privately; compute() needs it to be right.
    tm._update_count = int(state.get("update_count", 0))


def _sums(
    trackers: Mapping[str, _Tracker],
) -> tuple[Callable[[], list[float]], Callable[[list[float]], None]] | None:
    """Under a distributed strategy: the plain metrics' sums (total and count each) go into the
    pass's own reduction across ranks (one all-reduce per pass, by the stage), and come back as
    sums over every rank before ``after_fit`` / ``after_validate`` reads them. ``(read, write)``
    for ``Strategy.sum_at_end_of``, or ``None`` without plain metrics."""
    means = [t.epoch for t in trackers.values() if t.torchmetric is None]
    if not means:
        return None

    def read() -> list[float]:
        values: list[float] = []
        for mean in means:
            total = 0.0 if mean.total is None else float(mean.total)
            values += [total, float(mean.count)]
        return values

    def write(sums: list[float]) -> None:
        for i, mean in enumerate(means):
            mean.total = torch.tensor(sums[2 * i], dtype=torch.float64)
            mean.count = int(sums[2 * i + 1])

    return read, write


def _group(trackers: Mapping[str, _Tracker], strategy: Any) -> Any:
    """The process group torchmetrics sync their states on (the strategy's lane), or ``None``.

    torchmetrics sync in ``compute()``, a blocking collective: fine in the training flow, where
    every rank is at the same hook, refused in a concurrent validation (see
    ``Strategy.sum_at_end_of``)."""
    if strategy is None or all(t.torchmetric is None for t in trackers.values()):
        return None
    if strategy.in_concurrent_validation:
        raise RuntimeError(
            "Metrics: torchmetrics metrics synchronize their states across ranks with a blocking "
            "collective, which a concurrent validation cannot run (its hooks share the event "
            "loop with training); under a distributed strategy validate sequentially, or use "
            "plain metric functions"
        )
    return strategy.group


class Metrics(Callback):
    """Running metrics for training and validation, computed on the device.

    Each metric is given by name as one of:

    * ``"accuracy"``: :func:`accuracy` of ``state.output`` against the batch's targets;
    * ``"loss"``: the sample-weighted mean of ``state.loss``;
    * a function ``fn(output, targets) -> scalar tensor`` giving the batch's mean;
    * a ``torchmetrics.Metric`` (optional dependency): its ``update`` runs per batch and its
      ``compute`` once per epoch; the validation pass uses a copy. Build it with
      ``validate_args=False`` so that its update does not sync with the host either.

    Where results go:

    * training, at the end of the pass (``after_fit``): ``state.metrics["train_<name>"]``
      (batches that were skipped are left out);
    * training, every ``log_every_n_steps`` steps: ``state.metrics["train_<name>_step"]``, the
      mean over those steps (one host sync per metric per interval);
    * validation (``after_validate``): ``state.validation["<name>"]`` and
      ``state.metrics["val_<name>"]``, so early stopping and checkpoints can monitor them;
      with a mapping of validation sets, ``"<set>_<name>"`` and ``"val_<set>_<name>"``; in
      ``learner.test()``, ``"test_<name>"`` instead of ``"val_<name>"``.

    Args:
        metrics: ``{name: metric}``, or names of the built-ins (``["accuracy", "loss"]``).
        train: compute the metrics on training batches.
        validate: compute them on validation batches.
        log_every_n_steps: also report the recent training value every N steps.
        output_field: the state field holding the model's output (another stage may put, for
            instance, an EMA model's output elsewhere).
        loss_field: the state field holding the loss that the ``"loss"`` metric averages.
        prefix: prepended to every name (``prefix="ema_"`` gives ``val_ema_accuracy``).

    Raises:
        TypeError: a metric that is none of the above, a metric's name or a field that is not
            a non-empty str.
        ValueError: no metric, ``train=False`` with ``validate=False`` (nothing to compute), or
            a ``log_every_n_steps`` that is not an int of at least 1.

    A metric function that raises gets a note naming the metric; one that returns something
    other than a number (a string, ``None``) is refused by name.

    Reads ``batch``, ``output`` (or ``output_field``), ``loss`` (or ``loss_field``),
    ``validation_set`` and ``phase``; writes its own keys of ``metrics`` and ``validation``
    (declared per key: ``"metrics.val_accuracy"``, ``"validation.accuracy"``, ...; the same
    declarations cover ``test_`` keys and named validation sets), so other callbacks that add
    keys of their own need no order with it.

    Example:
        >>> import torchmetrics
        >>> metrics = Metrics({
        ...     "accuracy": "accuracy",
        ...     "f1": torchmetrics.F1Score(task="multiclass", num_classes=10,
        ...                                validate_args=False),
        ...     "mae": lambda out, y: (out.argmax(1) - y).abs().float().mean(),
        ... })
        >>> learner = Learner(..., callbacks=[metrics])
        >>> await learner.fit(3)
        >>> learner.state.metrics["val_f1"], learner.state.metrics["train_accuracy"]
    """

    reads = frozenset({"batch", "output", "loss"})
    writes = frozenset({"metrics", "validation"})

    def __init__(
        self,
        metrics: Mapping[str, Any] | Iterable[str] = ("accuracy",),
        *,
        train: bool = True,
        validate: bool = True,
        log_every_n_steps: int | None = None,
        output_field: str = "output",
        loss_field: str = "loss",
        prefix: str = "",
    ) -> None:
        log_every_n_steps = optional_whole("Metrics", "log_every_n_steps", log_every_n_steps, 1)
        output_field = named("Metrics", "output_field", output_field, "'output'")
        loss_field = named("Metrics", "loss_field", loss_field, "'loss'")
        if not isinstance(prefix, str):
            raise ArgumentTypeError(
                f"Metrics: prefix must be a str ('' for none), got {shown(prefix)}"
            )
        if not (train or validate):
            raise ValueError(
                "Metrics(train=False, validate=False) would compute nothing: keep train=True,"
                " validate=True or both"
            )
        if isinstance(metrics, str):
            raise TypeError(
                f"Metrics takes a list of metrics (or a dict of named ones), got the string "
                f"{metrics!r}: Metrics([{metrics!r}])"
            )
        specs: dict[str, Any] = (
            dict(metrics) if isinstance(metrics, Mapping) else {name: name for name in metrics}
        )
        if not specs:
            raise ValueError("Metrics needs at least one metric")
        for key in specs:
            named("Metrics", "each metric's name", key, "'accuracy' (Metrics({'accuracy': fn}))")
        spec = specs.get("loss", "loss") if prefix == "" else "loss"
        if not (isinstance(spec, str) and spec == "loss"):
            raise ValueError(
                "Metrics: a metric named 'loss' that is not the loss would take the place of "
                "the learner's own train_loss, val_loss and validation['loss'] (what "
                "EarlyStopping, Checkpoint and plateau schedules judge by): give it a name of "
                "its own (Metrics({'mae': fn})); Metrics(['loss']) is the batch-size-weighted "
                "loss itself"
            )
        self.log_every_n_steps = log_every_n_steps
        self.output_field = output_field
        self.loss_field = loss_field
        self.prefix = prefix
        # Reads depend on the fields, writes on the names: declared per instance (the learner
        # reads the attributes).
        self.__dict__["reads"] = frozenset(
            {"batch", output_field, loss_field, "validation_set", "phase"}
        )
        # Read on every batch: the learner refuses a field nothing writes when fit starts.
        losses = [isinstance(v, str) and v == "loss" for v in specs.values()]
        self._required_reads = {
            **({"output_field": output_field} if not all(losses) else {}),
            **({"loss_field": loss_field} if any(losses) else {}),
        }
        self._train: dict[str, _Tracker] = {}
        for name, spec in specs.items():
            if train:
                self._train[name] = _Tracker(name, spec, window=log_every_n_steps is not None)
        # Pristine copies (the training trackers update the originals); each set gets its own.
        self._val_specs = (
            {n: copy.deepcopy(v) if _is_torchmetric(v) else v for n, v in specs.items()}
            if validate
            else {}
        )
        # Per validation set (None: a single val_data), made when the set is first seen.
        self._val: dict[str | None, dict[str, _Tracker]] = {}
        self._steps_in_window = 0
        writes = set()
        for name in self._train:
            writes.add(f"metrics.train_{prefix}{name}")
            if log_every_n_steps is not None:
                writes.add(f"metrics.train_{prefix}{name}_step")
        for name in self._val_specs:
            writes.add(f"metrics.val_{prefix}{name}")
            writes.add(f"validation.{prefix}{name}")
        self.__dict__["writes"] = frozenset(writes)
        # What a distributed strategy sums across ranks at the end of each pass (a single
        # validation set: a strategy refuses several).
        self._sums = {
            "fit": _sums(self._train),
            "validate": _sums(self._val_trackers(None)) if self._val_specs else None,
        }

    def _val_trackers(self, name: str | None) -> dict[str, _Tracker]:
        trackers = self._val.get(name)
        if trackers is None:
            trackers = self._val[name] = {
                metric: _Tracker(
                    metric, copy.deepcopy(spec) if _is_torchmetric(spec) else spec, window=False
                )
                for metric, spec in self._val_specs.items()
            }
        return trackers

    def _update(self, trackers: dict[str, _Tracker], state: StateView) -> None:
        targets = split_batch(state.batch, self.name)[1]
        output = getattr(state, self.output_field)
        field = self.loss_field
        loss = getattr(state, field) if state.is_valid(field) else None
        for tracker in trackers.values():
            tracker.update(output, targets, loss)

    # -- training ------------------------------------------------------------------------------

    def after_fit_batch(self, state: StateView) -> None:
        """Accumulate the training batch (device ops only); report the window every N steps.

        Accumulating here rather than in ``after_gradient`` leaves out skipped batches (a
        :class:`NonFiniteGuard` dropping a NaN loss), since ``after_fit_batch`` does not run
        for them.
        """
        if not self._train:
            return
        if state.is_valid(self.output_field):
            self._update(self._train, state)
        every = self.log_every_n_steps
        if every is None:
            return
        self._steps_in_window += 1
        if self._steps_in_window >= every:
            self._steps_in_window = 0
            for name, tracker in self._train.items():
                value = tracker.window_value()
                if value is not None:
                    state.metrics[f"train_{self.prefix}{name}_step"] = value

    def before_fit_run(self, state: StateView) -> None:
        """Under a distributed strategy: hand the sums to the passes' own reductions."""
        strategy = state.strategy
        if strategy is not None:
            for kind, sums in self._sums.items():
                if sums is not None:
                    strategy.sum_at_end_of(kind, *sums)

    def after_fit(self, state: StateView) -> None:
        """Reduce the epoch (one host sync per metric) and start the next one."""
        group = _group(self._train, state.strategy)
        for name, tracker in self._train.items():
            value = tracker.epoch_value(group)
            if value is not None:
                state.metrics[f"train_{self.prefix}{name}"] = value
            tracker.reset_epoch()  # (a window of log_every_n_steps steps goes on)

    # -- validation ----------------------------------------------------------------------------

    def before_validate(self, state: StateView) -> None:
        """Start the validation accumulators."""
        for trackers in self._val.values():
            for tracker in trackers.values():
                tracker.reset()
        strategy = state.strategy
        sums = self._sums["validate"]
        if strategy is not None and sums is not None:
            strategy.sum_at_end_of("validate", *sums)  # also for validate() outside fit

    def after_validate_loss(self, state: StateView) -> None:
        """Accumulate the validation batch (device ops only), for its validation set."""
        if self._val_specs:
            name = state.validation_set if state.is_valid("validation_set") else None
            self._update(self._val_trackers(name), state)

    def after_validate(self, state: StateView) -> None:
        """Put the results in ``state.validation`` and ``state.metrics`` (``val_`` keys, or
        ``test_`` keys while ``learner.test()`` runs; a named set's name after the prefix)."""
        phase = "test_" if state.is_valid("phase") and state.phase == "test" else "val_"
        for set_name, trackers in self._val.items():
            group = _group(trackers, state.strategy)
            for name, tracker in trackers.items():
                value = tracker.epoch_value(group)
                if value is None:
                    continue
                key = f"{self.prefix}{name}"
                if set_name is not None:
                    key = f"{set_name}_{key}"
                state.validation[key] = value
                state.metrics[phase + key] = value
                tracker.reset()

    # -- checkpoints ---------------------------------------------------------------------------

    def state_dict(self) -> Mapping[str, Any]:
        """The training accumulators of the epoch in progress (to resume mid-epoch exactly)."""
        return {
            "train": {name: t.state() for name, t in self._train.items()},
            "steps_in_window": self._steps_in_window,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        saved = state.get("train", {})
        for name, tracker in self._train.items():
            if name in saved:
                tracker.load(saved[name])
        self._steps_in_window = int(state.get("steps_in_window", 0))
