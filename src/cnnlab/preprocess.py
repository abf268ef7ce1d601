"""How a run's images are prepared for its model, recorded once at training and read back at inference.

A `Preprocess` is saved in the checkpoint header (``header["data"]["preprocess"]``) and in ``config.json``.
`cnnlab.infer` reads it so that evaluate, predict, report, export and serve prepare pixels exactly as the run
did, instead of guessing again. Runs saved before the record existed get `Preprocess.for_dataset` defaults.

Pipeline for an image file: decode -> channels -> resize to ``size`` (``resize``/``interpolation``) ->
polarity (``invert``) -> uint8 [C, H, W]; then, for the model: /255 -> optional centre ``crop``.
Arrays of a dataset split are already at ``size``; only the last two steps apply to them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .errors import CheckpointError, ModelError

INVERT = ("auto", "no", "yes")
RESIZE = ("stretch", "shorter-crop")
INTERPOLATION = ("bilinear", "bicubic", "nearest", "lanczos")
# Light digits on black: users' own images are mostly dark ink on paper, so polarity is detected.
_AUTO_INVERT = ("mnist", "fashion-mnist")


@dataclass(frozen=True)
class Preprocess:
    """The preparation of one run's images.

    Attributes:
        size: (H, W) images are resized to (the training images' size).
        channels: 1 (grayscale) or 3 (RGB).
        invert: Polarity for image files: 'auto' inverts grayscale images with a light border (a dark digit
            on paper, for MNIST-like runs), 'no' never, 'yes' always.
        resize: 'stretch' to ``size``, or 'shorter-crop': shorter side to ``size``, then centre crop.
        interpolation: Resampling filter of the resize.
        mean: Per-channel mean the model normalises with, for information: normalisation lives inside the
            model, so its input stays float [0, 1] (None: not recorded).
        std: Per-channel standard deviation, likewise.
        crop: (H, W) centre crop of the resized image fed to the model, when the run evaluates on a crop (the
            CIFAR-10 tutorial trains on random 24x24 crops of its 32x32 images and evaluates the centre one);
            None feeds the whole image.
    """

    size: tuple[int, int]
    channels: int
    invert: str = "no"
    resize: str = "stretch"
    interpolation: str = "bilinear"
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    crop: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        # Normalise JSON lists to tuples so records compare equal however they were built.
        object.__setattr__(self, "size", tuple(int(v) for v in self.size))
        for name in ("mean", "std"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))
        if self.crop is not None:
            object.__setattr__(self, "crop", tuple(int(v) for v in self.crop))
        problem = self._problem()
        if problem:
            raise ValueError(f"bad preprocessing record: {problem}")

    def _problem(self) -> str:
        if len(self.size) != 2 or min(self.size) < 1:
            return f"size {self.size} is not (H, W) of positive integers"
        if self.channels not in (1, 3):
            return f"channels {self.channels} is not 1 or 3"
        for name, allowed in (("invert", INVERT), ("resize", RESIZE), ("interpolation", INTERPOLATION)):
            if getattr(self, name) not in allowed:
                return f"{name} {getattr(self, name)!r} is not one of {', '.join(allowed)}"
        if self.crop is not None and (len(self.crop) != 2 or min(self.crop) < 1):
            return f"crop {self.crop} is not (H, W) of positive integers"
        return ""

    @property
    def input_hw(self) -> tuple[int, int]:
        """(H, W) of what the model is fed: the crop when there is one, else ``size``."""
        return self.crop or self.size

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of a prepared image before the crop (the training images' shape)."""
        return (self.channels, *self.size)

    def to_json(self) -> dict:
        """A JSON-able dict (tuples as lists); `from_json` reads it back."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, d: dict) -> Preprocess:
        """The record saved by `to_json`; unknown keys (from a newer version) or bad values raise CheckpointError."""
        if not isinstance(d, dict):
            raise CheckpointError(f"preprocessing record is {type(d).__name__}, not a JSON object")
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise CheckpointError(f"preprocessing record has unknown keys {', '.join(unknown)} (newer cnnlab?)")
        try:
            return cls(**d)
        except (TypeError, ValueError) as e:
            raise CheckpointError(str(e)) from None

    @classmethod
    def for_dataset(cls, info, input_size: tuple[int, int, int]) -> Preprocess:
        """The defaults of a run saved before preprocessing was recorded.

        Such runs fed images of another size than the model's input centre-cropped or padded to it, so that
        becomes an explicit ``crop``. MNIST-like datasets ('mnist', 'fashion-mnist') predict with
        ``invert='auto'``, every other dataset (CIFAR-10, folders) with 'no', as they were trained.

        Args:
            info: A `DatasetInfo` (or anything with ``name`` and ``shape`` (C, H, W)).
            input_size: The model's (C, H, W).
        """
        c, h, w = (int(v) for v in info.shape)
        hw = tuple(int(v) for v in input_size[1:])
        return cls(size=(h, w), channels=c, invert=default_invert(info.name), crop=None if hw == (h, w) else hw)


def default_invert(dataset: str) -> str:
    """'auto' for the MNIST-like datasets (light digits on black), 'no' for the rest."""
    return "auto" if dataset in _AUTO_INVERT else "no"


def flexible_size(model_meta) -> bool:
    """Whether a model accepts any input size (``ModelMeta.flexible_size``; models without the flag do not)."""
    return bool(getattr(model_meta, "flexible_size", False))


def check_input(shape: tuple[int, int, int], input_size: tuple[int, int, int], *, flexible: bool = False,
                name: str = "the model") -> None:
    """Raise ModelError (one line) if images of ``shape`` (C, H, W) cannot be fed as they are to a model taking
    ``input_size`` (C, H, W): a fixed-size model takes exactly its size, a ``flexible`` one any size."""
    c, h, w = (int(v) for v in shape)
    mc, mh, mw = (int(v) for v in input_size)
    if c != mc:
        raise ModelError(f"images have {c} channel(s), {name} takes {mc}")
    if (h, w) != (mh, mw) and not flexible:
        # img_size is one side: a fixed-size model is built for square inputs only
        fix = (f"build the model for the data (img_size={h}) or resize the dataset" if h == w else
               f"{name} takes square inputs only: decode the images at its size (folder:PATH?size="
               f"{mh if mh == mw else f'{mh}x{mw}'}) or "
               f"at a square size N with img_size=N")
        raise ModelError(f"images are {h}x{w} but {name} takes {mh}x{mw} and no crop to that size is recorded; {fix}")


def for_training(info, model_meta, random_crop: bool, resized_crop: bool = False) -> Preprocess:
    """The record a new run saves: the dataset's size, channels and polarity, and how the model is fed.

    Images of the model's input size (or any size, for a flexible model) are fed whole. Larger images are
    fed as a crop only when the run trains on random crops of them (``random_crop``, as the CIFAR-10
    tutorial does, or ``resized_crop``: random-resized crops brought to the model's input size, as ImageNet
    training does): then evaluation and prediction use the centre crop of the model's input size, the size
    the model saw in training. Any other mismatch is an error, raised before training starts rather than
    silently cropping or padding every image.

    Args:
        info: The training set's `DatasetInfo` (its ``preprocess`` attribute, when a dataset has one, gives
            the resize and polarity it was prepared with).
        model_meta: The model's `ModelMeta`.
        random_crop: The run's ``random_crop`` setting.
        resized_crop: Whether the run trains on random-resized crops (``random_resized_crop`` set).

    Raises:
        ModelError: The images cannot be fed to the model as the run would train it.
    """
    base = getattr(info, "preprocess", None)
    c, h, w = (int(v) for v in info.shape)
    if base is None:
        base = Preprocess(size=(h, w), channels=c, invert=default_invert(info.name))
    args = getattr(model_meta, "args", None) or {}
    # For information: a model that normalises inside (timm's pretrained mean/std) names its values in its args.
    mean = getattr(model_meta, "mean", None) or args.get("mean")
    std = getattr(model_meta, "std", None) or args.get("std")
    mc, mh, mw = (int(v) for v in model_meta.input_size)
    crop = None
    if resized_crop and c == mc and (h, w) != (mh, mw):
        # Training sees crops resized to the model's input whatever the model; evaluation its centre crop.
        if h < mh or w < mw:
            raise ModelError(f"random_resized_crop trains {model_meta.name} on {mh}x{mw} crops but the images are "
                             f"{h}x{w}, too small for a {mh}x{mw} evaluation crop; decode them at least that big "
                             f"(e.g. folder:DIR?size={max(mh, mw)})")
        crop = (mh, mw)
    elif c == mc and (h, w) != (mh, mw) and not flexible_size(model_meta) and random_crop and h >= mh and w >= mw:
        crop = (mh, mw)  # train on random crops, evaluate on the centre one
    record = Preprocess(size=base.size, channels=base.channels, invert=base.invert, resize=base.resize,
                        interpolation=base.interpolation, mean=mean if mean is not None else base.mean,
                        std=std if std is not None else base.std, crop=crop)
    check_input((c, *record.input_hw), model_meta.input_size, flexible=flexible_size(model_meta), name=model_meta.name)
    return record
