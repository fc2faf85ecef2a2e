"""How a fitted implicit model compares with the labels and with its teacher (shared by ``sim`` and ``evaluate``)."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["compare_outputs"]


@torch.no_grad()
def compare_outputs(
    outputs: torch.Tensor, teacher_outputs: torch.Tensor | None, labels: torch.Tensor | None
) -> dict[str, Any]:
    """Accuracy and agreement of (m, q) model outputs.

    Returns ``accuracy`` (argmax vs labels), ``teacher_accuracy``, ``agreement`` (fraction of samples
    where the model's and the teacher's argmax agree; q > 1 only) and ``relative_output_error``
    ``||Y - Y_teacher||_F / ||Y_teacher||_F``; entries that cannot be computed are None.
    """
    outputs = outputs.detach().cpu().to(torch.float64)
    result: dict[str, Any] = {
        "samples": int(outputs.shape[0]),
        "accuracy": None,
        "teacher_accuracy": None,
        "agreement": None,
        "relative_output_error": None,
    }
    classify = outputs.shape[1] > 1
    if labels is not None and classify:
        result["accuracy"] = float((outputs.argmax(dim=1) == labels.cpu()).double().mean())
    if teacher_outputs is not None:
        teacher_outputs = teacher_outputs.detach().cpu().to(torch.float64)
        if classify:
            result["agreement"] = float(
                (outputs.argmax(dim=1) == teacher_outputs.argmax(dim=1)).double().mean()
            )
            if labels is not None:
                result["teacher_accuracy"] = float(
                    (teacher_outputs.argmax(dim=1) == labels.cpu()).double().mean()
                )
        scale = float(torch.linalg.norm(teacher_outputs))
        result["relative_output_error"] = float(torch.linalg.norm(outputs - teacher_outputs)) / max(
            scale, 1e-300
        )
    return result
