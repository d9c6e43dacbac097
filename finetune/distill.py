"""Knowledge distillation of a converted (separable) student from its dense teacher.

Pure torch (timm only for the example). Three pieces:

* :class:`DistillationLoss` – a loss module in the style of timm's ``task/distillation.py``:
  the teacher is frozen and stays in eval mode, it runs under ``no_grad`` on the **same**
  (augmented, student-normalised) images the student saw, every call (teacher logits are never
  cached), re-normalised when the teacher expects another mean/std, and the loss is

  ``loss = α·T²·KL(softmax(t/T) ‖ softmax(s/T)) + β·Σ_layers nMSE_l + (1−α)·CE(s, y)``

  with the per-layer feature term taken on the converted layers' outputs (forward hooks);
  without labels the CE term is dropped and the KD weight becomes 1;
* :func:`feature_layers_from_plan` – the converted layers' names from ``student.separable_plan``;
* :func:`compare_outputs` – teacher vs student on a few batches: top-1 agreement, mean KL,
  logit differences (and accuracies when labels come with the batches).

The student's forward stays in the training loop (the loss takes its logits), so the loop owns
the student (``accelerator.prepare``, DDP, ``torch.compile``) and the loss module only owns the
teacher: move it with ``loss.to(device)``.

>>> import torch, timm
>>> from finetune.convert import convert_to_separable
>>> from finetune.distill import DistillationLoss
>>> _ = torch.manual_seed(0)
>>> teacher = timm.create_model("resnet18", num_classes=10).eval()
>>> student = convert_to_separable(teacher, rank=1)
>>> opt = torch.optim.SGD(student.parameters(), lr=1e-3)
>>> x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
>>> with DistillationLoss(teacher, student, alpha=0.9, temperature=2.0, beta=0.1) as criterion:
...     out = criterion(x, student(x), y)
...     out["loss"].backward()
...     opt.step()
>>> sorted(out)
['feature_loss', 'kd_loss', 'loss', 'task_loss']
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from typing import Any, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle
from timm.utils import unwrap_model  # the module inside DDP / torch.compile wrappers

from finetune.convert.macs import model_device
from finetune.errors import FinetuneError

MeanStd = Union[tuple[Sequence[float], Sequence[float]], tuple[torch.Tensor, torch.Tensor], None]

__all__ = ["DistillationLoss", "agreement", "compare_outputs", "feature_layers_from_plan"]


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------

def feature_layers_from_plan(student: nn.Module) -> list[str]:
    """Names of the layers :func:`~finetune.convert.convert_to_separable` (or
    :func:`~finetune.convert.apply_plan`) converted, read from ``student.separable_plan``.

    The converter replaces each dense conv *at the same name*, so every name exists in the
    teacher too (as the original ``Conv2d``): these are the natural feature-matching points.
    Raises :class:`~finetune.errors.FinetuneError` when the model carries no plan.

    >>> from torch import nn
    >>> from finetune.convert import convert_to_separable
    >>> net = nn.Sequential(nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))
    >>> feature_layers_from_plan(convert_to_separable(net, rank=1))
    ['0', '2']
    """
    plan = getattr(unwrap_model(student), "separable_plan", None)
    if plan is None:
        raise FinetuneError(f"the student (`{type(unwrap_model(student)).__name__}`) has no `separable_plan`: it was "
                            "not made by convert_to_separable/apply_plan; pass feature_layers=[...] explicitly")
    if isinstance(plan, dict) and "layers" in plan:
        plan = plan["layers"]
    return [str(entry["name"]) for entry in plan]


def _as_stats(value: MeanStd, which: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    if value is None:
        return None
    try:
        mean, std = value
    except (TypeError, ValueError) as exc:
        raise FinetuneError(f"{which} must be a (mean, std) pair, got `{value!r}`") from exc
    mean_t = torch.as_tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1)
    if bool((std_t <= 0).any()):
        raise FinetuneError(f"{which}: every std must be > 0, got `{std_t.flatten().tolist()}`")
    return mean_t, std_t


def _first_tensor(output: Any) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        for item in output:
            if isinstance(item, torch.Tensor):
                return item
    return None


def _kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T²·KL(softmax(t/T) ‖ softmax(s/T))`` averaged over the batch, in float32."""
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return F.kl_div(log_s, log_t, reduction="batchmean", log_target=True) * (temperature ** 2)


class _Recorder:
    """Forward hooks that collect the outputs of named modules, one entry per call.

    Hooks only record for the exact modules they were registered on and stop recording once
    removed: a ``copy.deepcopy`` of a hooked model (e.g. a "best model" snapshot) carries copies
    of the hook functions, which must neither feed nor clear this record.
    """

    def __init__(self, model: nn.Module, names: Sequence[str], role: str) -> None:
        self.outputs: dict[str, list[torch.Tensor]] = {name: [] for name in names}
        self.handles: list[RemovableHandle] = []
        self.active = True
        for name in names:
            try:
                module = model.get_submodule(name) if name else model
            except AttributeError as exc:
                raise FinetuneError(f"feature layer `{name}` does not exist in the {role} "
                                    f"(`{type(model).__name__}`); feature_layers must name modules present "
                                    "in both models, e.g. feature_layers_from_plan(student)") from exc
            self.handles.append(module.register_forward_hook(self._hook(name, module)))
        # a new forward of the whole model starts a fresh record: eval-only forwards that never
        # reach the loss cannot pile up activations
        def clear_on_new_forward(module: nn.Module, args: Any) -> None:
            if module is model:
                self.clear()
        self.handles.append(model.register_forward_pre_hook(clear_on_new_forward))

    def _hook(self, name: str, owner: nn.Module):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if not self.active or module is not owner:
                return
            tensor = _first_tensor(output)
            if tensor is not None:
                self.outputs[name].append(tensor)
        return hook

    def clear(self) -> None:
        for values in self.outputs.values():
            values.clear()

    def remove(self) -> None:
        self.active = False
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.clear()


# --------------------------------------------------------------------------------------------
# The loss
# --------------------------------------------------------------------------------------------

class DistillationLoss(nn.Module):
    """Logit (+ optional per-layer feature) distillation loss from a frozen teacher.

    ``loss = α·T²·KL(softmax(t/T) ‖ softmax(s/T)) + β·Σ_l nMSE_l + (1−α)·CE(s, y)``

    * **KD term** – KL divergence of the student's temperature-softened distribution from the
      teacher's, ``reduction="batchmean"``, times ``T²`` so its gradient scale does not shrink
      with the temperature (Hinton et al.; timm's ``LogitDistillationTask``).
    * **Task term** – ``F.cross_entropy(student_logits, labels)`` (class indices or class
      probabilities). **Without labels** (an unlabeled image folder) the task term is dropped
      and the KD weight becomes 1 (not ``α``): ``loss = T²·KL + β·Σ nMSE``; ``task_loss`` is
      then ``None``.
    * **Feature term** – for each layer in ``feature_layers`` the output of that module in the
      student is matched to the output of the module of the same name in the teacher:
      ``nMSE_l = mean((s_l − t_l)²) / (mean(t_l²) + 1e-8)``, i.e. the MSE normalised by the
      teacher feature's mean square, so a layer whose activations are 10× larger does not weigh
      100× more; a perfect match gives 0 and a student that outputs zeros gives 1 per layer. The
      terms are **summed** over layers (β multiplies the sum). With ``feature_layers=None`` and
      ``beta > 0`` the layers are :func:`feature_layers_from_plan` ``(student)`` (the converter
      keeps module names, so they exist in both models). Student outputs are captured by forward
      hooks during the training loop's own ``student(images)`` call, so call the student right
      before the loss; hooks are registered once here and removed by :meth:`close` (or on leaving
      a ``with`` block).

    The teacher is frozen here (``requires_grad_(False)``, in place on the given module), kept in
    eval mode even after ``loss.train()`` and registered as a submodule (``loss.to(device)``
    moves it; a teacher left on another device also works: images go to it and its outputs come
    back); the student is *not* a submodule (the loop owns it and its optimizer). On every
    call the teacher runs under ``torch.no_grad()`` on ``images`` – the exact augmented view the
    student saw; nothing is cached, so a new view or epoch gets new teacher logits.

    ``student_mean_std`` / ``teacher_mean_std``: ``(mean, std)`` per channel that each model's
    inputs are normalised with. Give both (or neither): when they differ the teacher receives
    ``(images·std_s + mean_s − mean_t) / std_t`` (timm's ``normalize_input``); with neither the
    teacher gets ``images`` unchanged.

    ``forward`` returns ``{"loss", "kd_loss", "task_loss", "feature_loss"}``: ``loss`` is the
    weighted total (backprop this); the other three are the *unweighted* terms (``T²·KL``, CE or
    ``None``, ``Σ nMSE`` – 0 when no feature layers).

    >>> import torch
    >>> from torch import nn
    >>> teacher = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(4))
    >>> _ = teacher(torch.randn(1, 3, 8, 8))
    >>> import copy; student = copy.deepcopy(teacher)
    >>> loss_fn = DistillationLoss(teacher, student, alpha=0.5, temperature=2.0,
    ...                            beta=1.0, feature_layers=["0"])
    >>> x = torch.randn(2, 3, 8, 8)
    >>> out = loss_fn(x, student(x))          # no labels: loss = T²·KL + β·Σ nMSE
    >>> round(out["loss"].detach().item(), 6), out["task_loss"]
    (0.0, None)
    >>> loss_fn.close()
    """

    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module,
        *,
        alpha: float = 0.5,
        temperature: float = 2.0,
        beta: float = 0.0,
        feature_layers: Sequence[str] | None = None,
        teacher_mean_std: MeanStd = None,
        student_mean_std: MeanStd = None,
    ) -> None:
        super().__init__()
        if not 0.0 <= float(alpha) <= 1.0:
            raise FinetuneError(f"alpha must be in [0, 1] (weight of the KD term), got `{alpha}`")
        if not float(temperature) > 0.0 or not math.isfinite(float(temperature)):
            raise FinetuneError(f"temperature must be > 0 (typically 1-4), got `{temperature}`")
        if not float(beta) >= 0.0:
            raise FinetuneError(f"beta must be >= 0 (weight of the feature term), got `{beta}`")
        if teacher is student:
            raise FinetuneError("teacher and student are the same module: pass a copy as the teacher "
                                "(the teacher is frozen in place)")
        self.alpha = float(alpha)
        self.temperature = float(temperature)
        self.beta = float(beta)

        self.teacher = teacher
        self.teacher.requires_grad_(False)
        self.teacher.eval()

        if (teacher_mean_std is None) != (student_mean_std is None):
            given = "teacher_mean_std" if teacher_mean_std is not None else "student_mean_std"
            raise FinetuneError(f"only {given} was given: pass both teacher_mean_std and student_mean_std "
                                "(e.g. ((0, 0, 0), (1, 1, 1)) for un-normalised pixels), or neither")
        t_stats, s_stats = _as_stats(teacher_mean_std, "teacher_mean_std"), _as_stats(student_mean_std,
                                                                                      "student_mean_std")
        self.renormalize = t_stats is not None and s_stats is not None and not (
            t_stats[0].shape == s_stats[0].shape and torch.equal(t_stats[0], s_stats[0])
            and t_stats[1].shape == s_stats[1].shape and torch.equal(t_stats[1], s_stats[1]))
        zero, one = torch.zeros(1, 1, 1, 1), torch.ones(1, 1, 1, 1)
        self.register_buffer("teacher_mean", t_stats[0] if t_stats else zero, persistent=False)
        self.register_buffer("teacher_std", t_stats[1] if t_stats else one, persistent=False)
        self.register_buffer("student_mean", s_stats[0] if s_stats else zero.clone(), persistent=False)
        self.register_buffer("student_std", s_stats[1] if s_stats else one.clone(), persistent=False)

        if feature_layers is None:
            layers = feature_layers_from_plan(student) if self.beta > 0 else []
        else:
            layers = [feature_layers] if isinstance(feature_layers, str) else list(feature_layers)
        if self.beta > 0 and not layers:
            warnings.warn("DistillationLoss: beta > 0 but there are no feature layers (nothing was "
                          "converted?): the feature term is 0", UserWarning, stacklevel=2)
        self.feature_layers: list[str] = layers
        self._closed = False
        self._teacher_rec: _Recorder | None = None
        self._student_rec: _Recorder | None = None
        if layers:
            self._teacher_rec = _Recorder(unwrap_model(teacher), layers, "teacher")
            try:
                self._student_rec = _Recorder(unwrap_model(student), layers, "student")
            except Exception:
                self._teacher_rec.remove()
                raise

    # -- mode / lifetime -----------------------------------------------------------------------

    def train(self, mode: bool = True) -> DistillationLoss:
        """Set the loss module's mode; the teacher stays in eval mode regardless."""
        super().train(mode)
        self.teacher.eval()
        return self

    def close(self) -> None:
        """Remove the feature hooks from both models (idempotent). A loss with feature layers
        cannot be called after this; one without (logit terms only) keeps working."""
        for rec in (self._teacher_rec, self._student_rec):
            if rec is not None:
                rec.remove()
        self._closed = True

    def __enter__(self) -> DistillationLoss:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- forward -------------------------------------------------------------------------------

    def teacher_input(self, images: torch.Tensor) -> torch.Tensor:
        """``images`` (normalised for the student) re-normalised for the teacher:
        ``(images·std_s + mean_s − mean_t) / std_t``, or ``images`` itself when both models use
        the same normalisation."""
        if not self.renormalize:
            return images
        dev, dt = images.device, images.dtype
        return ((images * self.student_std.to(dev, dt) + self.student_mean.to(dev, dt)
                 - self.teacher_mean.to(dev, dt)) / self.teacher_std.to(dev, dt))

    def forward(self, images: torch.Tensor, student_logits: torch.Tensor,
                labels: torch.Tensor | None = None) -> dict[str, torch.Tensor | None]:
        """The distillation loss for one batch.

        ``images``: the batch the student just saw (same augmentation, student normalisation);
        ``student_logits``: ``student(images)`` from that call (its feature-layer outputs were
        recorded by the hooks); ``labels``: class indices / probabilities, or ``None``.
        Returns ``{"loss", "kd_loss", "task_loss", "feature_loss"}`` (see the class docstring).
        """
        if self._closed and self.feature_layers:
            raise FinetuneError("DistillationLoss was closed (its feature hooks are removed); make a new one")
        if self.teacher.training:  # someone called teacher.train() directly
            self.teacher.eval()
        try:
            t_dev = model_device(self.teacher)
            with torch.no_grad():
                t_in = self.teacher_input(images if t_dev is None else images.to(t_dev))
                teacher_logits = _first_tensor(self.teacher(t_in))
            if teacher_logits is not None:
                teacher_logits = teacher_logits.to(student_logits.device)
            if teacher_logits is None or teacher_logits.shape != student_logits.shape:
                got = None if teacher_logits is None else tuple(teacher_logits.shape)
                raise FinetuneError(f"teacher logits {got} and student logits {tuple(student_logits.shape)} "
                                    "differ in shape: teacher and student need the same classes")
            kd_loss = _kd(student_logits, teacher_logits.detach(), self.temperature)
            feature_loss = self._feature_loss(student_logits)
            if labels is None:
                task_loss = None
                loss = kd_loss
            else:
                task_loss = F.cross_entropy(student_logits.float(), labels)
                loss = self.alpha * kd_loss + (1.0 - self.alpha) * task_loss
            if self.beta > 0:
                loss = loss + self.beta * feature_loss
        finally:
            # never keep activations (and their graphs) past the call
            for rec in (self._teacher_rec, self._student_rec):
                if rec is not None:
                    rec.clear()
        return {"loss": loss, "kd_loss": kd_loss, "task_loss": task_loss, "feature_loss": feature_loss}

    def _feature_loss(self, like: torch.Tensor) -> torch.Tensor:
        total = like.new_zeros((), dtype=torch.float32)
        if not self.feature_layers:
            return total
        assert self._teacher_rec is not None and self._student_rec is not None
        for name in self.feature_layers:
            s_outs, t_outs = self._student_rec.outputs[name], self._teacher_rec.outputs[name]
            if not s_outs:
                raise FinetuneError(f"no student output was recorded at feature layer `{name}`: call "
                                    "student(images) right before the loss (same images, hooks not closed)")
            if len(s_outs) != len(t_outs):
                raise FinetuneError(f"feature layer `{name}` ran {len(s_outs)}x in the student but "
                                    f"{len(t_outs)}x in the teacher for one batch")
            for s, t in zip(s_outs, t_outs):
                if s.shape != t.shape:
                    raise FinetuneError(f"feature layer `{name}`: student output {tuple(s.shape)} vs "
                                        f"teacher output {tuple(t.shape)}")
                t = t.detach().to(s.device).float()
                total = total + F.mse_loss(s.float(), t) / (t.pow(2).mean() + 1e-8)
        return total


# --------------------------------------------------------------------------------------------
# Side-by-side comparison
# --------------------------------------------------------------------------------------------

def _split_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, dict):
        images = batch.get("images", batch.get("image", batch.get("pixel_values")))
        labels = batch.get("labels", batch.get("label"))
        if not isinstance(images, torch.Tensor):
            raise FinetuneError(f"batch dict has no `images`/`image`/`pixel_values` tensor (keys {list(batch)})")
        return images, labels if isinstance(labels, torch.Tensor) else None
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        labels = batch[1] if len(batch) > 1 and isinstance(batch[1], torch.Tensor) else None
        return batch[0], labels
    raise FinetuneError(f"a batch must be a tensor, (images, labels) or a dict, got `{type(batch).__name__}`")


def agreement(teacher_logits: torch.Tensor, student_logits: torch.Tensor,
              labels: torch.Tensor | None = None) -> dict[str, float | int | None]:
    """How closely a student follows its teacher, from their logits on the same images: the one
    agreement measure that ``finetune convert`` (converted vs dense) and ``finetune distill``
    (student before/after vs teacher) report.

    Returns ``{"n", "agreement", "kl", "relative_logit_error", "max_abs_diff", "mean_abs_diff",
    "teacher_acc", "student_acc"}``: ``agreement`` – share of images whose top-1 classes agree;
    ``kl`` – mean over images of ``KL(softmax(t) ‖ softmax(s))`` (T = 1, nats);
    ``relative_logit_error`` – ‖s − t‖ / ‖t‖ over all logits; ``max_abs_diff`` / ``mean_abs_diff``
    – largest / mean absolute logit difference; accuracies only with class-index ``labels``.

    >>> t = torch.tensor([[2.0, 0.0], [0.0, 1.0]]); s = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    >>> stats = agreement(t, s, torch.tensor([0, 1]))
    >>> stats["agreement"], stats["teacher_acc"], stats["student_acc"], stats["max_abs_diff"]
    (0.5, 1.0, 0.5, 1.0)
    """
    s_logits, t_logits = student_logits.detach().float().cpu(), teacher_logits.detach().float().cpu()
    if s_logits.shape != t_logits.shape:
        raise FinetuneError(f"teacher logits {tuple(t_logits.shape)} and student logits "
                            f"{tuple(s_logits.shape)} differ in shape")
    n = s_logits.shape[0]
    if n == 0:
        raise FinetuneError("no images to compare teacher and student on")
    s_top, t_top = s_logits.argmax(-1), t_logits.argmax(-1)
    diff = (s_logits - t_logits).abs()
    labelled = labels is not None and labels.dim() == 1 and not labels.is_floating_point()
    labels = labels.cpu() if labelled else None
    return {
        "n": n,
        "agreement": float((s_top == t_top).float().mean()),
        "kl": float(_kd(s_logits, t_logits, 1.0)),
        "relative_logit_error": float(diff.pow(2).sum() / t_logits.pow(2).sum().clamp_min(1e-12)) ** 0.5,
        "max_abs_diff": float(diff.max()) if diff.numel() else 0.0,
        "mean_abs_diff": float(diff.mean()) if diff.numel() else 0.0,
        "teacher_acc": float((t_top == labels).float().mean()) if labelled else None,
        "student_acc": float((s_top == labels).float().mean()) if labelled else None,
    }


@torch.no_grad()
def compare_outputs(
    teacher: nn.Module,
    student: nn.Module,
    batches: Iterable[Any],
    *,
    teacher_mean_std: MeanStd = None,
    student_mean_std: MeanStd = None,
) -> dict[str, float | int | None]:
    """:func:`agreement` of teacher and student on ``batches`` (tensors, ``(images, labels)`` pairs
    or dicts), both run in eval mode (modes restored afterwards). ``*_mean_std`` re-normalise the
    teacher's input as in :class:`DistillationLoss` (images are normalised for the student).

    >>> import copy, torch
    >>> from torch import nn
    >>> teacher = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    >>> stats = compare_outputs(teacher, copy.deepcopy(teacher), [torch.randn(4, 3, 2, 2)])
    >>> stats["agreement"], stats["max_abs_diff"], stats["n"]
    (1.0, 0.0, 4)
    """
    if (teacher_mean_std is None) != (student_mean_std is None):
        raise FinetuneError("pass both teacher_mean_std and student_mean_std, or neither")
    t_stats, s_stats = _as_stats(teacher_mean_std, "teacher_mean_std"), _as_stats(student_mean_std,
                                                                                  "student_mean_std")
    modes = {m: m.training for m in list(teacher.modules()) + list(student.modules())}
    teacher.eval()
    student.eval()
    t_all, s_all, label_all = [], [], []
    try:
        for batch in batches:
            images, labels = _split_batch(batch)
            s_dev, t_dev = model_device(student), model_device(teacher)
            s_logits = _first_tensor(student(images.to(s_dev) if s_dev is not None else images))
            t_in = images.to(t_dev) if t_dev is not None else images
            if t_stats is not None and s_stats is not None:
                dev, dt = t_in.device, t_in.dtype
                t_in = ((t_in * s_stats[1].to(dev, dt) + s_stats[0].to(dev, dt) - t_stats[0].to(dev, dt))
                        / t_stats[1].to(dev, dt))
            t_logits = _first_tensor(teacher(t_in))
            assert s_logits is not None and t_logits is not None
            t_all.append(t_logits.float().cpu())
            s_all.append(s_logits.float().cpu())
            label_all.append(labels.cpu() if labels is not None else None)
    finally:
        for module, flag in modes.items():
            module.training = flag
    if not t_all:
        raise FinetuneError("compare_outputs got no batches")
    labels = torch.cat(label_all) if all(x is not None for x in label_all) else None
    return agreement(torch.cat(t_all), torch.cat(s_all), labels)
