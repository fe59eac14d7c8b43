"""What a base model predicts (ε or v) and on which noise schedule, and why we think so (torch-free:
`train --check` uses it too).

Training a v-prediction model as if it predicted ε "does not throw errors but results in empty
images" (sd-scripts #1772), so the prediction type is read from the model unless the config says:

- a diffusers folder or Hub model: its scheduler config (`prediction_type`,
  `rescale_betas_zero_snr`);
- a single `.safetensors` file: the top-level marker keys `v_pred` and `ztsnr` that v-prediction
  checkpoints such as NoobAI-XL v-pred carry, read as ComfyUI's SDXL loader reads them (`ztsnr`
  counts only with `v_pred`); without them, the component configs' scheduler (SDXL: ε).

`train.zero_terminal_snr` (Lin et al. 2023) follows the model on "auto", or forces the schedule on
or off. The result goes into the scheduler config every consumer builds from (training noise,
validation loss, the samplers), so they cannot disagree.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from train.names import PREDICTION_TYPES, V_PRED_KEY, ZTSNR_KEY

logger = logging.getLogger(__name__)
_MAX_HEADER = 100 * 2**20  # safetensors' own limit on a header


@dataclass(frozen=True)
class Prediction:
    """The prediction type and schedule a model is trained and sampled with, and where they came from."""

    prediction_type: str  # train.names.PREDICTION_TYPES
    zero_terminal_snr: bool
    reason: str  # one line for the run log and the LoRA metadata

    def scheduler_config(self, config: dict) -> dict:
        """`config` (a diffusers scheduler config) predicting this type on this schedule."""
        return {**config, "prediction_type": self.prediction_type, "rescale_betas_zero_snr": self.zero_terminal_snr}


def single_file_markers(path: str | Path) -> set[str]:
    """The marker keys (`v_pred`, `ztsnr`) among a safetensors file's tensor names.

    Read from the header alone (8-byte little-endian length, then JSON), so `train --check` needs
    no torch and no tensor is loaded.

    Raises:
        ValueError: not a safetensors file.
    """
    with open(path, "rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        if not 2 <= size <= _MAX_HEADER:
            raise ValueError(f"{path}: not a safetensors file (header of {size} bytes)")
        try:
            header = json.loads(handle.read(size))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ValueError(f"{path}: not a safetensors file (unreadable header)") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: not a safetensors file (header is not a table)")  # noqa: TRY004 (bad input)
    return {key for key in header if key in (V_PRED_KEY, ZTSNR_KEY)}


def detect(scheduler_config: dict, *, origin: str, markers: set[str] | None = None) -> Prediction:
    """What the model says: the marker keys of a single file (`markers` not None), else `scheduler_config`.

    `origin` names where the scheduler config came from (for the reason).
    """
    if markers is not None and V_PRED_KEY in markers:
        ztsnr = ZTSNR_KEY in markers
        keys = f"'{V_PRED_KEY}'" + (f" and '{ZTSNR_KEY}' keys" if ztsnr else " key")
        return Prediction("v_prediction", ztsnr, f"the checkpoint carries the {keys}")
    prediction_type = scheduler_config.get("prediction_type") or "epsilon"
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"{origin}: prediction_type {prediction_type!r} is not supported "
                         f"(expected one of {PREDICTION_TYPES})")
    ztsnr = bool(scheduler_config.get("rescale_betas_zero_snr", False))
    if markers is not None:
        return Prediction(prediction_type, ztsnr, f"no '{V_PRED_KEY}' key in the checkpoint: {origin} says "
                          f"{prediction_type}")
    return Prediction(prediction_type, ztsnr, f"{origin} says {prediction_type}"
                      + (" with rescale_betas_zero_snr" if ztsnr else ""))


def resolve(detected: Prediction, prediction_type: str = "auto", zero_terminal_snr: bool | str = "auto") -> Prediction:
    """The detected prediction, overridden by the config's `model.prediction_type` and
    `train.zero_terminal_snr` where they are not "auto" (a disagreement is logged as a warning).

    Raises:
        ValueError: zero terminal SNR on an ε-prediction model (its last timestep is pure noise,
            where ε says nothing about the image).
    """
    result, reasons = detected, [detected.reason]
    if prediction_type != "auto":
        if prediction_type != detected.prediction_type:
            logger.warning("model.prediction_type = %r overrides what the model says (%s: %s)", prediction_type,
                           detected.prediction_type, detected.reason)
        result = Prediction(prediction_type, result.zero_terminal_snr, "")
        reasons = [f"model.prediction_type = '{prediction_type}'"]
    if zero_terminal_snr != "auto" and zero_terminal_snr != result.zero_terminal_snr:
        result = Prediction(result.prediction_type, bool(zero_terminal_snr), "")
        reasons.append(f"train.zero_terminal_snr = {str(zero_terminal_snr).lower()}")
    if result.zero_terminal_snr and result.prediction_type == "epsilon":
        raise ValueError(f"zero terminal SNR needs a v-prediction model, this one predicts epsilon "
                         f"({'; '.join(reasons)}): set train.zero_terminal_snr = false, or "
                         f"model.prediction_type = 'v_prediction' if the model is v-prediction")
    return Prediction(result.prediction_type, result.zero_terminal_snr, "; ".join(reasons))
