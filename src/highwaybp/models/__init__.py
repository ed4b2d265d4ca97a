"""Architectures cast as residual chains (each module says how its K is declared)."""

from highwaybp.models.huggingface import from_huggingface
from highwaybp.models.mlp import ResidualMLP
from highwaybp.models.resnet import (
    CifarResNet,
    resnet20,
    resnet32,
    resnet56,
    resnet110,
    resnet_cifar,
)
from highwaybp.models.resnet1d import ResNet1d, build_resnet1d
from highwaybp.models.rnn import GRU, LSTM, CellRNN
from highwaybp.models.torchvision import from_torchvision
from highwaybp.models.transformer import GPT, EncoderClassifier

__all__ = [
    "GPT",
    "GRU",
    "LSTM",
    "CellRNN",
    "CifarResNet",
    "EncoderClassifier",
    "ResNet1d",
    "ResidualMLP",
    "build_resnet1d",
    "from_huggingface",
    "from_torchvision",
    "resnet20",
    "resnet32",
    "resnet56",
    "resnet110",
    "resnet_cifar",
]
