"""Random image distortions for training, computed on the training device.

Every function is written once against the array namespace ``xp`` of its inputs (NumPy on the
CPU, CuPy on a GPU), so the same code runs on both. A batch is distorted by

1. one **sampling grid** per image: an affine transform about the image centre (rotation,
   scale, shear, translation) plus, optionally, a smooth **elastic** displacement field
   (Simard et al. 2003);
2. **one bilinear gather** over the whole batch (:func:`warp`): samples that fall outside the
   image read ``fill``, the background value;
3. optional additive Gaussian **noise**.

There is no per-image Python loop and no host synchronisation: nothing is read back from the
device and nothing is drawn on the host per batch. The random numbers come from a
counter-based generator written with ``xp`` integer operations (splitmix64's finaliser over
``(seed, epoch, image id, stream, draw index)``), so NumPy and CuPy produce the same bits, a
given image in a given epoch always gets the same distortion, whatever the batch it is in, and
nothing has to be carried between batches.

Use :func:`parse_augment` for a spec (``"default"``, ``"rotate=10,translate=2"``, ...) and
:func:`augment_batch` per training batch. The lower-level pieces (:func:`image_keys`,
:func:`uniforms`, :func:`normals`, :func:`affine_theta`, :func:`sample_grid`,
:func:`elastic_field`, :func:`warp`) are public for tests and other uses.

Elastic fields are drawn on a coarse lattice (:func:`elastic_field`): white noise on nodes
``elastic_sigma`` pixels apart, smoothed onto the pixels by the Gaussian weights of each axis,
as two small GEMMs for the whole batch (which also add the affine part). That costs 288
uniforms (72 hashes) per image at sigma 4 instead of 1,568 plus a full-resolution blur, and
gives a field with the full-resolution one's standard deviation and correlation length.

Cost on the CPU, for a batch of 128 MNIST images: see :func:`augment_batch`.

The package: :mod:`.spec` (the spec), :mod:`.counters` (the random numbers),
:mod:`.geometry` (grids and elastic fields), :mod:`.warp` (the gather and the batch
functions).
"""

from lenet_xp.data.augment.counters import (
    STREAM_AFFINE,
    STREAM_ELASTIC,
    STREAM_NOISE,
    image_keys,
    normals,
    uniforms,
)
from lenet_xp.data.augment.geometry import (
    ELASTIC_MARGIN,
    affine_theta,
    elastic_field,
    elastic_matrices,
    elastic_nodes,
    elastic_step,
    sample_grid,
)
from lenet_xp.data.augment.spec import NAMED, Augment, parse_augment
from lenet_xp.data.augment.warp import Distortion, augment_batch, distortion_grid, finish, warp
from lenet_xp.data.mnist import BACKGROUND

__all__ = [
    "BACKGROUND", "ELASTIC_MARGIN", "NAMED", "STREAM_AFFINE", "STREAM_ELASTIC", "STREAM_NOISE",
    "Augment", "Distortion", "affine_theta", "augment_batch", "distortion_grid",
    "elastic_field", "elastic_matrices", "elastic_nodes", "elastic_step", "finish",
    "image_keys", "normals", "parse_augment", "sample_grid", "uniforms", "warp",
]  # fmt: skip
