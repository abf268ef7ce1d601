"""The five tutorial architectures, layer for layer as the tutorials define them:

* ``tf-estimator-cnn``: TensorFlow guide "Build a Convolutional Neural Network using Estimators" (tf.layers,
  MNIST), https://www.tensorflow.org/tutorials/estimators/cnn (TensorFlow 1.x documentation);
* ``tf-core-convnet``: "Guide to coding a custom Convolutional Neural Network in TensorFlow Core"
  (Towards Data Science);
* ``tf2-convnet``: Aymeric Damien's TensorFlow-Examples, ``convolutional_network_raw`` for TF2,
  https://github.com/aymericdamien/TensorFlow-Examples;
* ``cifar10-prettytensor``: Hvass-Labs TensorFlow Tutorial #06 "CIFAR-10",
  https://github.com/Hvass-Labs/TensorFlow-Tutorials;
* ``lenet5``: the habr.com article "LeNet-5 своими руками" (LeNet-5 by hand) and its code, kukumber/lenet5.

All take float input in [0, 1] of shape [N, C, H, W] and return logits. Kernels are Glorot-uniform
and biases zero, TensorFlow's defaults, so the tutorials' optimiser settings behave as they did there.
"""

from __future__ import annotations

from torch import nn

from .layers import Dropout, flat_features, same_conv, same_pool, tf_init_
from .registry import CnnModel, ModelMeta, register_model


def _build(name: str, features: nn.Sequential, head_layers: list[nn.Module], input_size, num_classes) -> CnnModel:
    """Assemble features + (flatten, head_layers) and initialise the TensorFlow way."""
    head = nn.Sequential(nn.Flatten(), *head_layers)
    meta = ModelMeta(name=name, input_size=tuple(input_size), num_classes=num_classes)
    return tf_init_(CnnModel(features, head, meta))


@register_model("tf-estimator-cnn", description="conv32 5x5 -> pool -> conv64 5x5 -> pool -> fc1024 -> dropout 0.4")
def tf_estimator_cnn(num_classes: int = 10, in_chans: int = 1, img_size: int = 28, dropout: float = 0.4) -> CnnModel:
    """The tf.estimator MNIST CNN: two SAME 5x5 ReLU convs (32, 64) with 2x2 max pools, dense 1024, dropout."""
    size = (in_chans, img_size, img_size)
    features = nn.Sequential(
        same_conv(in_chans, 32, 5), nn.ReLU(), same_pool(2),  # [N,32,14,14]
        same_conv(32, 64, 5), nn.ReLU(), same_pool(2),  # [N,64,7,7]
    )
    n = flat_features(features, size)  # 3136 for 28x28
    head = [nn.Linear(n, 1024), nn.ReLU(), Dropout(dropout), nn.Linear(1024, num_classes)]
    return _build("tf-estimator-cnn", features, head, size, num_classes)


@register_model("tf-core-convnet", description="4 x conv3x3 (16,16,32,32) with 2 pools -> fc128 -> dropout 0.2")
def tf_core_convnet(num_classes: int = 10, in_chans: int = 1, img_size: int = 28, dropout: float = 0.2,
                    hidden: int = 128) -> CnnModel:
    """The TensorFlow-Core low-level ConvNet: conv16-conv16-pool-conv32-conv32-pool, dense, dropout 0.2.

    The tutorial's text fixes the convolutions (3x3, 16/16/32/32, bias + ReLU, SAME, 2x2 pools after the
    second and fourth) and the 7*7*32 flatten; the width of its first dense layer is not in the text we
    have, and 128 is the value of the article's code.
    """
    size = (in_chans, img_size, img_size)
    features = nn.Sequential(
        same_conv(in_chans, 16, 3), nn.ReLU(),
        same_conv(16, 16, 3), nn.ReLU(), same_pool(2),  # [N,16,14,14]
        same_conv(16, 32, 3), nn.ReLU(),
        same_conv(32, 32, 3), nn.ReLU(), same_pool(2),  # [N,32,7,7]
    )
    n = flat_features(features, size)  # 7*7*32 = 1568
    head = [nn.Linear(n, hidden), nn.ReLU(), Dropout(dropout), nn.Linear(hidden, num_classes)]
    return _build("tf-core-convnet", features, head, size, num_classes)


@register_model("tf2-convnet",
                description="conv32 5x5 VALID -> pool -> conv64 3x3 VALID -> pool -> fc1024 -> dropout 0.5")
def tf2_convnet(num_classes: int = 10, in_chans: int = 1, img_size: int = 28, dropout: float = 0.5) -> CnnModel:
    """The TF2 low-level ConvNet (Aymeric Damien): Keras Conv2D defaults, i.e. VALID padding.

    Note the tutorial's dense layer fc1 has no activation (``layers.Dense(1024)``), kept here.
    """
    size = (in_chans, img_size, img_size)
    features = nn.Sequential(
        nn.Conv2d(in_chans, 32, 5), nn.ReLU(), nn.MaxPool2d(2, 2),  # [N,32,12,12]
        nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2, 2),  # [N,64,5,5]
    )
    n = flat_features(features, size)  # 1600
    head = [nn.Linear(n, 1024), Dropout(dropout), nn.Linear(1024, num_classes)]
    return _build("tf2-convnet", features, head, size, num_classes)


@register_model("cifar10-prettytensor",
                description="24x24 crops: conv64 5x5 +BN -> pool -> conv64 5x5 -> pool -> fc256 -> fc128")
def cifar10_prettytensor(num_classes: int = 10, in_chans: int = 3, img_size: int = 24) -> CnnModel:
    """The Hvass-Labs CIFAR-10 PrettyTensor network (tutorial #06), ReLU everywhere, BN in conv1 only.

    PrettyTensor's batch norm: epsilon 1e-3; its conv has no bias when normalised (BN's shift replaces it).
    """
    size = (in_chans, img_size, img_size)
    features = nn.Sequential(
        same_conv(in_chans, 64, 5, bias=False), nn.BatchNorm2d(64, eps=1e-3), nn.ReLU(), same_pool(2),  # [N,64,12,12]
        same_conv(64, 64, 5), nn.ReLU(), same_pool(2),  # [N,64,6,6]
    )
    n = flat_features(features, size)  # 2304
    head = [nn.Linear(n, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, num_classes)]
    return _build("cifar10-prettytensor", features, head, size, num_classes)


@register_model("lenet5",
                description="conv6 5x5 SAME tanh -> pool -> conv16 5x5 VALID relu -> pool -> fc120 -> fc84 (tanh)")
def lenet5(num_classes: int = 10, in_chans: int = 1, img_size: int = 28) -> CnnModel:
    """LeNet-5 as the habr 'LeNet-5 своими руками' tutorial codes it for 28x28 MNIST.

    C1 uses SAME padding in place of padding the image to 32x32; pools are max pools; C3 uses ReLU
    exactly as the tutorial's code does (its text says tanh); F5/F6 use tanh.
    """
    size = (in_chans, img_size, img_size)
    features = nn.Sequential(
        same_conv(in_chans, 6, 5), nn.Tanh(), nn.MaxPool2d(2, 2),  # [N,6,14,14]
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2, 2),  # [N,16,5,5]
    )
    n = flat_features(features, size)  # 400
    head = [nn.Linear(n, 120), nn.Tanh(), nn.Linear(120, 84), nn.Tanh(), nn.Linear(84, num_classes)]
    return _build("lenet5", features, head, size, num_classes)
