"""The teacher's side of a distilled run: its predictions as validation labels on an unlabelled
folder, and the student compared with it before training and after (top-1 of each, and the
share of validation images on which the student's top-1 class is the teacher's:
:func:`finetune.distill.agreement`).

>>> print(distillation_table({"teacher_top1": 0.9, "student_before_top1": 0.5, "student_after_top1": 0.8,
...                           "agreement_before": 0.55, "agreement_after": 0.85}))
<BLANKLINE>
model                        val top-1  top-1 agreement with teacher
teacher                         0.9000
student before distillation     0.5000                        0.5500
student after distillation      0.8000                        0.8500
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

from finetune.config import Recipe
from finetune.data import FolderSplit
from finetune.distill import DistillationLoss, agreement
from finetune.train.build import TeacherView, build_distiller, build_loaders, teacher_labels
from finetune.train.loop import gather_logits
from finetune.train.session import RunData


@dataclass
class TeacherComparison:
    """The distiller, and the teacher's validation logits and the student's standing before training."""

    distiller: DistillationLoss
    teacher_logits: torch.Tensor
    teacher_top1: float
    student_before_top1: float
    agreement_before: float


def start_distillation(recipe: Recipe, student: nn.Module, split: FolderSplit, data: RunData,
                       accelerator: Accelerator, unlabelled: bool, meta: dict[str, Any]) -> TeacherComparison:
    """Load the teacher; on an unlabelled folder relabel validation with its predictions (``split``,
    ``data`` and ``meta`` change); measure teacher and student on the validation loader."""
    distiller = build_distiller(recipe, student, data.data_config, split.classes).to(accelerator.device)
    if unlabelled:
        split.val = teacher_labels(TeacherView(distiller), split.val, data.data_config, accelerator.device)
        _, val_loader = build_loaders(recipe, split, data.data_config)
        data.val_loader = accelerator.prepare(val_loader)
        meta["data"]["val_labels"] = "teacher predictions (unlabelled folder): val top-1 = agreement"
        accelerator.print("unlabelled folder: validation accuracy is agreement with the teacher's predictions")
    # gather_logits() gathers across processes: every process holds all validation logits, in loader order
    teacher_logits, labels = gather_logits(TeacherView(distiller).to(accelerator.device), data.val_loader,
                                           accelerator, data.memory_format)
    student_logits, labels = gather_logits(student.to(accelerator.device), data.val_loader, accelerator,
                                           data.memory_format)
    before = agreement(teacher_logits, student_logits, labels)
    comparison = TeacherComparison(distiller, teacher_logits, before["teacher_acc"], before["student_acc"],
                                   before["agreement"])
    accelerator.print(f"distilling from {recipe.distill.teacher}: teacher val top-1 {comparison.teacher_top1:.4f}, "
                      f"student before {comparison.student_before_top1:.4f} (top-1 agreement with the teacher "
                      f"{comparison.agreement_before:.4f})")
    return comparison


def finish_distillation(comparison: TeacherComparison, logits: torch.Tensor, labels: torch.Tensor,
                        top1: float, teacher: str, accelerator: Accelerator) -> dict[str, Any]:
    """``metrics["distillation"]`` from the best student's validation logits; prints the table and
    removes the distiller's hooks."""
    report = {"teacher_top1": comparison.teacher_top1, "student_before_top1": comparison.student_before_top1,
              "student_after_top1": top1, "teacher": teacher, "agreement_before": comparison.agreement_before,
              "agreement_after": agreement(comparison.teacher_logits, logits, labels)["agreement"]}
    comparison.distiller.close()
    accelerator.print(distillation_table(report))
    return report


def distillation_table(report: dict[str, Any]) -> str:
    """The teacher/student table printed at the end of a distilled run (a blank line first)."""
    return "\n".join([
        "", f"{'model':<28}{'val top-1':>10}{'top-1 agreement with teacher':>30}",
        f"{'teacher':<28}{report['teacher_top1']:>10.4f}",
        f"{'student before distillation':<28}{report['student_before_top1']:>10.4f}{report['agreement_before']:>30.4f}",
        f"{'student after distillation':<28}{report['student_after_top1']:>10.4f}{report['agreement_after']:>30.4f}",
    ])
