"""From uint8 images to training batches: preprocessing, validation split, batches, augmentation.

    norm = Standardize().fit(ds.x_train)   # per-channel mean / std of the training set
    for x, y in batches(ds.x_train, ds.y_train, 128, shuffle=True, seed=0, epoch=epoch,
                        device="gpu", augment=partial(random_crop_flip, pad=4, flip=True),
                        transform=norm):
        ...                                # x float32 (128, C, H, W) on the GPU, y int64

The order of the batches and every augmentation draw are a pure function of (seed, epoch): a run
resumed at epoch e sees exactly the batches it would have seen. Augmentation and normalisation run
on the device of the batch, with that array's module (NumPy or CuPy): only the N crop offsets and
flip flags are drawn on the host.

The paper's preprocessing for CIFAR (as in Maxout): global contrast normalisation, every image
scaled to L2 norm 55 after removing its mean, then ZCA whitening with filter bias 0.1
(`fit_gcn_zca`).
"""
import numpy as np

from .backend import array_module, resolve_device, to_device

__all__ = ["Standardize", "channel_stats", "gcn", "GcnZca", "fit_gcn_zca", "split_validation",
           "Batches", "batches", "crop_flip", "random_crop_flip", "RandomCropFlip", "erase_boxes",
           "RandomErase", "Augmentations"]

_CHUNK = 4096  # images per step when statistics are accumulated (bounds the float64 copies)


# ---------------------------------------------------------------------------------------------
# Per-channel standardisation: (x - mean_c) / std_c, statistics from the training set.

def channel_stats(x):
    """Per-channel mean and standard deviation of NCHW images: float64 NumPy arrays, shape (C,)."""
    xp = array_module(x)
    total = np.zeros(x.shape[1])
    squares = np.zeros(x.shape[1])
    for start in range(0, len(x), _CHUNK):
        chunk = x[start:start + _CHUNK].astype(xp.float64)
        total += to_device(chunk.sum(axis=(0, 2, 3)), "cpu")
        squares += to_device((chunk * chunk).sum(axis=(0, 2, 3)), "cpu")
    count = x.shape[0] * x.shape[2] * x.shape[3]
    mean = total / count
    return mean, np.sqrt(np.maximum(squares / count - mean * mean, 0.0))


class Standardize:
    """x -> (x - mean) / std per channel, float32; `fit` on the training set, `apply` anywhere."""

    def __init__(self, mean=None, std=None, eps=1e-8):
        self.eps = eps
        self._set(mean, std)

    def _set(self, mean, std):
        self.mean = None if mean is None else np.asarray(mean, np.float64)
        self.std = None if std is None else np.asarray(std, np.float64)
        self._on_device = {}  # array module name -> (mean, 1/std) as float32 (1, C, 1, 1) there

    def fit(self, x):
        self._set(*channel_stats(x))
        return self

    def apply(self, x):
        """float32 NCHW on x's device."""
        if self.mean is None:
            raise RuntimeError("Standardize.apply before fit: call fit(x_train) first")
        xp = array_module(x)
        if xp.__name__ not in self._on_device:  # copied once, not once per batch
            shape = (1, -1, 1, 1)
            self._on_device[xp.__name__] = (
                xp.asarray(self.mean.reshape(shape), dtype=xp.float32),
                xp.asarray((1.0 / np.maximum(self.std, self.eps)).reshape(shape), dtype=xp.float32))
        mean, scale = self._on_device[xp.__name__]
        return (x.astype(xp.float32) - mean) * scale

    __call__ = apply

    def state_dict(self):
        return {"mean": self.mean, "std": self.std}

    def load_state_dict(self, state):
        self._set(state["mean"], state["std"])
        return self


# ---------------------------------------------------------------------------------------------
# Global contrast normalisation + ZCA whitening (Goodfellow et al. 2013, as used by NIN).

def gcn(x, scale=55.0, min_divisor=1e-8):
    """Each image: subtract its mean, then scale its pixels to L2 norm `scale`. float32 NCHW."""
    xp = array_module(x)
    flat = x.reshape(len(x), -1).astype(xp.float32)
    flat -= flat.mean(axis=1, keepdims=True)
    norm = xp.sqrt((flat * flat).sum(axis=1, keepdims=True)) / scale
    # where(), not norm[norm < min_divisor] = 1: a boolean-mask assignment makes CuPy read the
    # mask's count back to the host, a sync that would stall every batch.
    norm = xp.where(norm < min_divisor, xp.float32(1.0), norm)
    return (flat / norm).reshape(x.shape)


class GcnZca:
    """GCN then ZCA whitening: z = (gcn(x) - mean) @ W, W = U diag(1/sqrt(s + bias)) U^T.

    (U, s) are the eigenvectors and eigenvalues of the covariance of the GCN'd training images.
    """

    def __init__(self, mean, whitening, scale=55.0):
        self.mean = np.asarray(mean, np.float32)           # (D,)
        self.whitening = np.asarray(whitening, np.float32)  # (D, D), symmetric
        self.scale = scale
        self._on_device = {}  # array module name -> (mean, whitening) already copied there

    def apply(self, x):
        """float32 NCHW on x's device."""
        xp = array_module(x)
        if xp.__name__ not in self._on_device:
            self._on_device[xp.__name__] = (xp.asarray(self.mean), xp.asarray(self.whitening))
        mean, whitening = self._on_device[xp.__name__]
        flat = gcn(x, self.scale).reshape(len(x), -1)
        return ((flat - mean) @ whitening).reshape(x.shape)

    __call__ = apply

    def state_dict(self):
        return {"mean": self.mean, "whitening": self.whitening, "scale": np.float64(self.scale)}

    @classmethod
    def from_state_dict(cls, state):
        return cls(state["mean"], state["whitening"], float(state["scale"]))


def fit_gcn_zca(x_train, scale=55.0, filter_bias=0.1):
    """Fit GCN + ZCA on the training images; returns a GcnZca.

    The (D, D) Gram matrix is summed chunk by chunk on x_train's device (float32 products, float64
    running sums on the host); the eigendecomposition runs on the host in float64.
    """
    xp = array_module(x_train)
    n, dim = len(x_train), int(np.prod(x_train.shape[1:]))
    total = np.zeros(dim)
    gram = np.zeros((dim, dim))
    for start in range(0, n, _CHUNK):
        chunk = gcn(x_train[start:start + _CHUNK], scale).reshape(-1, dim)
        total += to_device(chunk.sum(axis=0, dtype=xp.float64), "cpu")
        gram += to_device(chunk.T @ chunk, "cpu")
    mean = total / n
    covariance = gram / n - np.outer(mean, mean)
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    scales = 1.0 / np.sqrt(np.maximum(eigenvalues, 0.0) + filter_bias)
    whitening = (eigenvectors * scales) @ eigenvectors.T
    return GcnZca(mean, whitening, scale)


# ---------------------------------------------------------------------------------------------
# Validation split and batches.

def split_validation(x, y, n_val, seed=0):
    """Hold out `n_val` random examples: (x_train, y_train, x_val, y_val); order otherwise kept."""
    if not 0 <= n_val < len(x):
        raise ValueError(f"n_val={n_val} must be in 0..{len(x) - 1} for {len(x)} examples")
    held = np.zeros(len(x), bool)
    held[np.random.default_rng(seed).choice(len(x), n_val, replace=False)] = True
    keep, val = np.flatnonzero(~held), np.flatnonzero(held)
    return x[keep], y[keep], x[val], y[val]


class Batches:
    """The batches of one epoch: iterate it (each pass gives the same batches), or take its len().

    Yields (x, y) arrays on `device`: x is what `transform(augment(x))` returns (uint8 when neither
    is given), y int64. The permutation and every augmentation draw come from
    `np.random.default_rng([seed, epoch])`, in that order.
    """

    def __init__(self, x, y, batch_size, shuffle=False, seed=0, epoch=0, device="cpu", augment=None,
                 transform=None, drop_last=False):
        if len(x) != len(y):
            raise ValueError(f"{len(x)} images but {len(y)} labels")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.x, self.y = x, y
        self.batch_size, self.shuffle, self.drop_last = int(batch_size), shuffle, drop_last
        self.seed, self.epoch, self.device = int(seed), int(epoch), resolve_device(device)
        self.augment, self.transform = augment, transform

    def __len__(self):
        full, rest = divmod(len(self.x), self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def __iter__(self):
        return self.iterate()

    def iterate(self, start=0):
        """The batches from batch `start` on, the same as iter(self) gives from there. The batches
        before it are skipped by replaying only their host draws (an augment with a `draw` method,
        like RandomCropFlip); nothing of theirs is gathered, augmented or preprocessed."""
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(len(self.x)) if self.shuffle else np.arange(len(self.x))
        for index in range(len(self)):
            chosen = order[index * self.batch_size:(index + 1) * self.batch_size]
            if index < start and hasattr(self.augment, "draw"):
                self.augment.draw(len(chosen), rng)
                continue
            x = to_device(_take(self.x, chosen), self.device)
            y = to_device(_take(self.y, chosen), self.device).astype("int64", copy=False)
            if self.augment is not None:
                x = self.augment(x, rng=rng)
            if index < start:
                continue  # an augment without `draw`: its draws were made on the images
            if self.transform is not None:
                x = self.transform(x)
            yield x, y


def _take(array, indices):
    """array[indices], with the indices moved to the array's device first."""
    xp = array_module(array)
    return array[xp.asarray(indices)]


def batches(x, y, batch_size, shuffle=False, seed=0, epoch=0, device="cpu", augment=None,
            transform=None, drop_last=False):
    """The batches of epoch `epoch`, a pure function of (seed, epoch); see `Batches`.

    augment: called as `augment(x_batch, rng=generator)` on the device, e.g.
             `functools.partial(random_crop_flip, pad=4, flip=True)`.
    transform: called as `transform(x_batch)` after augment, e.g. a fitted `Standardize`.
    """
    return Batches(x, y, batch_size, shuffle, seed, epoch, device, augment, transform, drop_last)


# ---------------------------------------------------------------------------------------------
# Augmentation: random crop of a zero-padded image, and horizontal flip.

def crop_flip(batch, pad, offsets_y, offsets_x, flips=None):
    """out[n] = zero_pad(batch[n], pad)[:, oy[n]:oy[n]+H, ox[n]:ox[n]+W], mirrored where flips[n].

    One gather on batch's device, no loop over images. offsets in 0..2*pad, host or device arrays.
    """
    xp = array_module(batch)
    n, c, h, w = batch.shape
    padded = xp.zeros((n, c, h + 2 * pad, w + 2 * pad), batch.dtype)
    padded[:, :, pad:pad + h, pad:pad + w] = batch
    rows = xp.asarray(offsets_y).reshape(n, 1) + xp.arange(h)       # (N, H)
    cols = xp.asarray(offsets_x).reshape(n, 1) + xp.arange(w)       # (N, W)
    if flips is not None:
        cols = xp.where(xp.asarray(flips).reshape(n, 1), cols[:, ::-1], cols)
    return padded[xp.arange(n)[:, None, None, None], xp.arange(c)[None, :, None, None],
                  rows[:, None, :, None], cols[:, None, None, :]]


def random_crop_flip(batch, pad=4, flip=True, rng=None):
    """Random translation by up to `pad` pixels (zero padding) and, if `flip`, a random mirror.

    The N offsets and flags are drawn on the host from `rng` (a NumPy Generator); the images move
    only on their own device. Leave flip off for digits.
    """
    return RandomCropFlip(pad, flip)(batch, rng=rng)


class RandomCropFlip:
    """random_crop_flip(batch, pad, flip, rng) as an object, with its host draws apart (`draw`), so
    that a resumed epoch can replay the draws of the batches it skips without touching images."""

    def __init__(self, pad=4, flip=True):
        self.pad, self.flip = pad, flip

    def draw(self, n, rng):
        """(offsets_y, offsets_x, flips or None) for n images, drawn from rng in this order."""
        offsets_y = rng.integers(0, 2 * self.pad + 1, n)
        offsets_x = rng.integers(0, 2 * self.pad + 1, n)
        flips = rng.random(n) < 0.5 if self.flip else None
        return offsets_y, offsets_x, flips

    def __call__(self, batch, rng=None):
        rng = np.random.default_rng() if rng is None else rng
        return crop_flip(batch, self.pad, *self.draw(len(batch), rng))


# ---------------------------------------------------------------------------------------------
# Augmentation: random erasing (Zhong et al., 2017), and several augmentations in a row.

def erase_boxes(batch, top, left, heights, widths):
    """out[n] = batch[n] with rows top[n]..top[n]+heights[n]-1 and columns left[n]..left[n]+widths[n]-1
    set to 0 in every channel (a height of 0 leaves the image as it is). One select, no loop."""
    xp = array_module(batch)
    _, _, h, w = batch.shape
    top, left = xp.asarray(top)[:, None], xp.asarray(left)[:, None]
    rows, cols = xp.arange(h)[None, :], xp.arange(w)[None, :]
    in_rows = (rows >= top) & (rows < top + xp.asarray(heights)[:, None])      # (N, H)
    in_cols = (cols >= left) & (cols < left + xp.asarray(widths)[:, None])     # (N, W)
    box = in_rows[:, None, :, None] & in_cols[:, None, None, :]                # (N, 1, H, W)
    return xp.where(box, batch.dtype.type(0), batch)


class RandomErase:
    """With probability p, set one random rectangle of an image to 0 (black) in every channel:
    random erasing (Zhong et al., 2017), the occlusion a net must learn to see past.

    The rectangle's area is a fraction of the image drawn uniformly from `scale`, its aspect ratio
    (height / width) log-uniformly from `ratio`; it is cut to the image's size and placed uniformly
    where it fits. Two differences from torchvision's RandomErasing, hence the other name: the
    fill is the pixel value 0 before standardisation (black, Fashion-MNIST's background), where
    torchvision's default fills 0 after normalisation (the mean), and a rectangle too large for
    the image is cut to it, where torchvision draws again up to ten times.
    """

    def __init__(self, p=0.5, scale=(0.02, 0.33), ratio=(0.3, 3.3)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"erase probability {p!r}: expected a number in [0, 1]")
        if not 0.0 < scale[0] <= scale[1] <= 1.0 or not 0.0 < ratio[0] <= ratio[1]:
            raise ValueError(f"erase scale {scale!r} and ratio {ratio!r}: expected "
                             "0 < scale[0] <= scale[1] <= 1 and 0 < ratio[0] <= ratio[1]")
        self.p, self.scale, self.ratio = float(p), tuple(scale), tuple(ratio)

    def draw(self, n, rng):
        """(erase, area, log_ratio, top_fraction, left_fraction) for n images, drawn from rng in
        this order whatever the image size, so that skipped batches replay them (Batches.iterate)."""
        erase = rng.random(n) < self.p
        area = rng.uniform(self.scale[0], self.scale[1], n)
        log_ratio = rng.uniform(np.log(self.ratio[0]), np.log(self.ratio[1]), n)
        return erase, area, log_ratio, rng.random(n), rng.random(n)

    @staticmethod
    def boxes(draws, h, w):
        """The (top, left, heights, widths) of the rectangles the draws make on an h x w image."""
        erase, area, log_ratio, top_fraction, left_fraction = draws
        ratio = np.exp(log_ratio)
        heights = np.clip(np.rint(np.sqrt(area * h * w * ratio)), 1, h).astype(np.int64)
        widths = np.clip(np.rint(np.sqrt(area * h * w / ratio)), 1, w).astype(np.int64)
        top = np.floor(top_fraction * (h - heights + 1)).astype(np.int64)
        left = np.floor(left_fraction * (w - widths + 1)).astype(np.int64)
        return top, left, np.where(erase, heights, 0), widths

    def __call__(self, batch, rng=None):
        rng = np.random.default_rng() if rng is None else rng
        return erase_boxes(batch, *self.boxes(self.draw(len(batch), rng), *batch.shape[2:]))


class Augmentations:
    """Several augmentations applied in order, each drawing from the same rng in that order."""

    def __init__(self, *augments):
        self.augments = augments

    def draw(self, n, rng):
        return [augment.draw(n, rng) for augment in self.augments]

    def __call__(self, batch, rng=None):
        rng = np.random.default_rng() if rng is None else rng
        for augment in self.augments:
            batch = augment(batch, rng=rng)
        return batch
