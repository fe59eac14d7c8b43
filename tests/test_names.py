"""Where a table in `train.names` must match another, the two agree."""

from __future__ import annotations

import argparse
import typing

from train import names
from train.config import ModelConfig, SampleConfig
from train.names import DATASET_COLUMNS, OPTIONAL_TRAINING_COLUMNS, TRAINING_COLUMNS


def _choices(model, field: str) -> tuple:
    return typing.get_args(model.model_fields[field].annotation)


def test_sampler_names_are_the_implemented_samplers():
    from train.generate import k_samplers

    assert names.SAMPLERS == tuple(k_samplers.SAMPLERS)
    assert names.SCHEDULERS == tuple(k_samplers.SCHEDULERS)
    assert _choices(SampleConfig, "sampler") == names.SAMPLER_CHOICES == (*names.SAMPLERS, names.DIFFUSERS_SAMPLER)
    assert _choices(SampleConfig, "scheduler") == names.SCHEDULERS
    assert _choices(SampleConfig, "noise_device") == names.NOISE_DEVICES


def test_command_line_sampler_choices_are_the_config_choices():
    from train.cli.options import add_sampler_arguments

    parser = argparse.ArgumentParser()
    add_sampler_arguments(parser)
    choices = {action.dest: tuple(action.choices) for action in parser._actions if action.choices}
    assert choices == {"sampler": names.SAMPLER_CHOICES, "scheduler": names.SCHEDULERS,
                       "noise_device": names.NOISE_DEVICES}


def test_precision_names_are_the_torch_dtypes_loading_knows():
    from train.model.loading import TORCH_DTYPES

    assert tuple(TORCH_DTYPES) == names.DTYPE_NAMES == _choices(ModelConfig, "weight_dtype")


def test_prep_writes_every_column_the_trainer_reads():
    from train.prep.writer import FEATURES

    assert list(FEATURES) == list(DATASET_COLUMNS)
    assert set(TRAINING_COLUMNS) | set(OPTIONAL_TRAINING_COLUMNS) <= set(DATASET_COLUMNS)


def test_checkpoint_names_match_the_pattern():
    assert names.CHECKPOINT_DIR_RE.match(names.checkpoint_name(7)).group(1) == "000007"
    assert names.CHECKPOINT_DIR_RE.match(names.checkpoint_name(1234567))
    assert not names.CHECKPOINT_DIR_RE.match("checkpoint-12")


def test_model_aliases_have_checkpoint_file_names():
    from train.generate.workflow import KNOWN_CHECKPOINTS

    assert set(names.MODEL_ALIASES) | {names.OPT_FILE_ALIAS} == set(KNOWN_CHECKPOINTS)


def test_loss_names_are_the_config_choices_and_are_implemented():
    import torch

    from train import diffusion
    from train.cli.options import add_prediction_arguments
    from train.config import TrainConfig

    assert _choices(TrainConfig, "loss_type") == names.LOSS_TYPES
    assert _choices(TrainConfig, "huber_schedule") == names.HUBER_SCHEDULES
    assert _choices(ModelConfig, "prediction_type") == ("auto", *names.PREDICTION_TYPES)
    parser = argparse.ArgumentParser()
    add_prediction_arguments(parser)
    choices = {action.dest: tuple(action.choices) for action in parser._actions if action.choices}
    assert choices["prediction_type"] == ("auto", *names.PREDICTION_TYPES)
    t, abar, x = torch.tensor([0, 1]), torch.tensor([0.9, 0.5]), torch.ones(2, 1, 1, 1)
    for schedule in names.HUBER_SCHEDULES:
        c = diffusion.huber_threshold(schedule, 0.1, t, abar)
        for loss_type in names.LOSS_TYPES:
            assert diffusion.elementwise_loss(x, 0 * x, loss_type, c).shape == x.shape
    for prediction_type in names.PREDICTION_TYPES:
        diffusion.training_target(prediction_type, x, x, t, abar)
        diffusion.debiased_weight(torch.tensor([1.0]), prediction_type)
