"""Random distortions (lenet_xp.data.augment): the identity, exactness against shift_images and
scipy, what rotations and translations do to real digits, the counter-based generator's
statistics, the elastic field's statistics and smoothness, determinism, CPU/GPU agreement,
parse errors and cost."""

import dataclasses
import math
import warnings

import numpy as np
import pytest
from conftest import DATA, DEVICES, needs_cuda, needs_mnist

from lenet_xp.backend import asnumpy, get_device, to_device
from lenet_xp.data.augment import (
    BACKGROUND,
    NAMED,
    STREAM_AFFINE,
    STREAM_NOISE,
    Augment,
    Distortion,
    affine_theta,
    augment_batch,
    elastic_field,
    elastic_step,
    image_keys,
    normals,
    parse_augment,
    sample_grid,
    uniforms,
    warp,
)
from lenet_xp.data.device_split import shift_images
from lenet_xp.data.mnist import MEAN, STD, load_mnist

FILL = -MEAN / STD
assert BACKGROUND == FILL

# Wrapping uint64 arithmetic (and everything else here) must not warn.
pytestmark = pytest.mark.filterwarnings("error")


def _images(n: int = 32, seed: int = 0) -> np.ndarray:
    """Normalised float32 images: random values, so every pixel matters."""
    return np.random.default_rng(seed).standard_normal((n, 1, 28, 28)).astype(np.float32)


def _smooth_images(n: int = 128, seed: int = 0) -> np.ndarray:
    """Digit-like normalised float32 images: blurred noise in MNIST's value range, so a
    sampling-grid difference of d pixels changes a value by at most ~d (real digits: ~3d)."""
    from scipy.ndimage import gaussian_filter

    noise = np.random.default_rng(seed).standard_normal((n, 1, 28, 28))
    smooth = gaussian_filter(noise, (0, 0, 1.5, 1.5))
    smooth = (smooth - smooth.min()) / (smooth.max() - smooth.min())
    return ((smooth - MEAN) / STD).astype(np.float32)


def _on(device: str, *arrays: np.ndarray):
    dev = get_device(device)
    return [to_device(a, dev) for a in arrays]


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    """256 MNIST test digits, normalised as training sees them, ``(256, 1, 28, 28)``."""
    data = load_mnist(DATA, download=False, progress=False)
    x = data.test_images[:256, None].astype(np.float32) / 255
    return ((x - MEAN) / STD).astype(np.float32)


def _mass_and_centre(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ink above the background per image and its centre of mass ``(N, 2)`` (row, col)."""
    ink = np.asarray(x, dtype=np.float64)[:, 0] - FILL
    mass = ink.sum(axis=(1, 2))
    rows, cols = np.arange(28.0)[:, None], np.arange(28.0)[None, :]
    centre = np.stack([(ink * rows).sum(axis=(1, 2)), (ink * cols).sum(axis=(1, 2))], 1)
    return mass, centre / mass[:, None]


# ----------------------------------------------------------------------------------------------
# Specs
# ----------------------------------------------------------------------------------------------


def test_named_specs_and_key_value_specs():
    assert parse_augment("none") == Augment() and Augment().is_identity
    assert parse_augment("default") == Augment(rotate=10, scale=0.1, shear=5, translate=2)
    assert parse_augment(" Light ") is NAMED["light"]
    assert parse_augment("strong").elastic_alpha == 34 and parse_augment("strong").noise > 0
    assert parse_augment("rotate=10,scale=0.1,translate=2,elastic=34:4,noise=0.1") == Augment(
        rotate=10, scale=0.1, translate=2, elastic_alpha=34, elastic_sigma=4, noise=0.1
    )
    assert parse_augment("elastic=20") == Augment(elastic_alpha=20, elastic_sigma=4)
    assert parse_augment("elastic_alpha=8, elastic_sigma=2") == Augment(
        elastic_alpha=8, elastic_sigma=2
    )
    assert parse_augment("light,noise=0.05") == dataclasses.replace(NAMED["light"], noise=0.05)
    assert parse_augment("shear=0") == Augment()  # explicit zeros: still the identity
    odd = [Augment(elastic_alpha=3.5, elastic_sigma=1.25, shear=2), Augment(rotate=1 / 3)]
    for aug in [*NAMED.values(), *odd, Augment(elastic_sigma=2)]:
        assert parse_augment(aug.spec) == aug  # the spec string round-trips
    assert parse_augment(NAMED["strong"]) is NAMED["strong"]


@pytest.mark.parametrize(
    ("spec", "names"),
    [
        ("spin=3", "'spin'"),
        ("rotate=abc", "'abc'"),
        ("rotate", "'rotate'"),
        ("rotate=-5", "rotate=-5"),
        ("noise=nan", "noise=nan"),
        ("translate=inf", "translate=inf"),
        ("scale=1", "scale"),
        ("shear=90", "shear"),
        ("rotate=180", "rotate"),
        ("elastic=34:0", "elastic_sigma"),
        ("elastic=34:x", "'x'"),
        ("rotate=5,,noise=1", "empty"),
        ("", "empty"),
        ("rotate=5,light", "'light'"),
        ("medium", "'medium'"),
    ],
)
def test_parse_errors_are_one_line_naming_the_problem_and_the_keys(spec, names):
    with pytest.raises(ValueError) as info:
        parse_augment(spec)
    message = str(info.value)
    assert "\n" not in message
    assert names in message
    for key in ("rotate", "scale", "shear", "translate", "elastic", "noise", "default"):
        assert key in message


def test_augment_rejects_bad_strengths():
    for bad in ({"rotate": -1.0}, {"noise": math.nan}, {"scale": 1.0}, {"elastic_sigma": 0.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            Augment(**bad)
    with pytest.raises(ValueError, match="number"):
        Augment(rotate=True)


# ----------------------------------------------------------------------------------------------
# Exactness of the gather
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_none_is_the_identity(device):
    x, ids = _on(device, _images(8), np.arange(8, dtype=np.int64))
    for aug in (parse_augment("none"), Augment(elastic_sigma=2)):
        assert augment_batch(x, aug, ids, seed=0, epoch=3) is x


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_whole_pixel_translation_equals_shift_images(device, dtype):
    """An integer-translation grid through warp gives exactly shift_images' pixels, for an
    input in any memory layout; a translation off the image gives the background."""
    rng = np.random.default_rng(1)
    host = _images(32).astype(dtype)
    down, right = rng.integers(-2, 3, size=(2, 32))
    theta = np.zeros((32, 2, 3), dtype=np.float32)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    theta[:, 0, 2], theta[:, 1, 2] = -down, -right  # source = output - shift
    x, theta_d, down_d, right_d = _on(device, host, theta, down, right)
    xp = get_device(device).xp
    transposed = xp.ascontiguousarray(x.transpose(0, 1, 3, 2)).transpose(0, 1, 3, 2)
    expected = asnumpy(shift_images(x, down_d, right_d, 2, FILL))
    for layout in (x, transposed, x[:, :, ::-1][:, :, ::-1]):
        out = warp(layout, sample_grid(theta_d, 28, 28), FILL)
        assert out.dtype == x.dtype and out.flags.c_contiguous
        np.testing.assert_array_equal(asnumpy(out), expected)
    theta[:, 0, 2] = 40  # every sample far below the image
    out = warp(x, sample_grid(to_device(theta, get_device(device)), 28, 28), FILL)
    assert (asnumpy(out) == np.asarray(FILL, dtype=dtype)).all()


def test_warp_is_bilinear_with_fill_outside_like_scipy():
    """Rotated, scaled, sheared and shifted grids: warp equals scipy's order-1
    affine_transform with the image continued by the fill value ("grid-constant")."""
    from scipy.ndimage import affine_transform

    x = _images(16)
    aug = Augment(rotate=30, scale=0.3, shear=20, translate=6)  # many samples fall outside
    theta = affine_theta(aug, image_keys(np.arange(16), 5, 0), 28, 28)
    out = warp(x, sample_grid(theta, 28, 28), FILL)
    for i in range(16):
        ref = affine_transform(
            x[i, 0].astype(np.float64),
            theta[i, :, :2].astype(np.float64),
            offset=theta[i, :, 2].astype(np.float64),
            order=1,
            mode="grid-constant",
            cval=FILL,
        )
        np.testing.assert_allclose(out[i, 0], ref, atol=2e-5)


def test_affine_theta_inverts_the_drawn_transform():
    """theta is the inverse of out = c + t + s R(a) Sh(k) (in - c), with the parameters
    from the image's affine uniforms; zero strengths give exactly the identity matrix."""
    aug = Augment(rotate=20, scale=0.2, shear=10, translate=3)
    keys = image_keys(np.arange(64), 9, 2)
    u = uniforms(keys, STREAM_AFFINE, 5).astype(np.float64) * 2 - 1
    angle, s = np.radians(aug.rotate) * u[:, 0], 1 + aug.scale * u[:, 1]
    k = np.tan(np.radians(aug.shear) * u[:, 2])
    t = aug.translate * u[:, 3:5][:, ::-1]  # (x, y) = (col, row)
    c = np.array([13.5, 13.5])
    theta = affine_theta(aug, keys, 28, 28)
    for i in range(64):
        cos, sin = np.cos(angle[i]), np.sin(angle[i])
        forward = s[i] * np.array([[cos, -sin], [sin, cos]]) @ np.array([[1, k[i]], [0, 1]])
        inverse = np.linalg.inv(forward)  # in (x, y) = inverse (out - c - t) + c
        offset = c - inverse @ (c + t[i])
        expected = np.array(  # (row, col) order
            [
                [inverse[1, 1], inverse[1, 0], offset[1]],
                [inverse[0, 1], inverse[0, 0], offset[0]],
            ]
        )
        np.testing.assert_allclose(theta[i], expected, atol=2e-5)
    shift_only = affine_theta(Augment(translate=2), keys, 28, 28)
    np.testing.assert_array_equal(shift_only[:, :, :2], np.broadcast_to(np.eye(2), (64, 2, 2)))
    assert np.abs(shift_only[:, :, 2]).max() <= 2


# ----------------------------------------------------------------------------------------------
# What distortions do to real digits
# ----------------------------------------------------------------------------------------------


@needs_mnist
@pytest.mark.parametrize("device", DEVICES)
def test_translation_moves_the_centre_of_mass_by_the_drawn_offset(digits, device):
    """Bilinear translation keeps the ink and moves its centre by exactly the offset (for
    the digits with 3 blank pixels at every edge, which stay inside the picture)."""
    aug = Augment(translate=2)
    inner = np.zeros((28, 28), dtype=bool)
    inner[3:-3, 3:-3] = True
    digits = digits[(digits[:, 0, ~inner] <= FILL + 1e-6).all(axis=1)]
    assert len(digits) > 150
    ids = np.arange(1000, 1000 + len(digits))
    x, ids_d = _on(device, digits, ids)
    out = asnumpy(augment_batch(x, aug, ids_d, seed=4, epoch=0))
    shift = -affine_theta(aug, image_keys(ids, 4, 0), 28, 28)[:, :, 2]  # (row, col)
    assert np.abs(shift).max() > 1.5  # fractional offsets up to 2 pixels were drawn
    mass, centre = _mass_and_centre(digits)
    mass_out, centre_out = _mass_and_centre(out)
    np.testing.assert_allclose(mass_out, mass, rtol=1e-4)
    np.testing.assert_allclose(centre_out - centre, shift, atol=0.01)


@needs_mnist
@pytest.mark.parametrize("device", DEVICES)
def test_small_rotation_keeps_mass_within_3pc_and_centre_within_half_a_pixel(digits, device):
    x, ids = _on(device, digits, np.arange(len(digits)))
    out = asnumpy(augment_batch(x, Augment(rotate=5), ids, seed=0, epoch=0))
    mass, centre = _mass_and_centre(digits)
    mass_out, centre_out = _mass_and_centre(out)
    assert np.abs(mass_out / mass - 1).max() < 0.03
    assert np.abs(centre_out - centre).max() < 0.5
    changed = np.abs(out - digits).max(axis=(1, 2, 3))
    assert (changed > 0.1).mean() > 0.9  # the digits did turn


@needs_mnist
def test_every_named_spec_keeps_digits_whole_and_recognisable(digits):
    """Ink is kept on average (each image's scales with the zoom's square, up to +-32 %),
    and blurred (sigma 2) pictures still correlate strongly with the originals:
    distortions move strokes by a pixel or two."""
    from scipy.ndimage import gaussian_filter

    ids = np.arange(len(digits))
    mass, _ = _mass_and_centre(digits)
    blurred = gaussian_filter(digits, (0, 0, 2, 2))
    least = {"none": 0.999, "light": 0.95, "default": 0.85, "strong": 0.75}
    for name, aug in NAMED.items():
        out = augment_batch(digits, aug, ids, seed=0, epoch=1)
        assert out.shape == digits.shape and out.dtype == np.float32, name
        assert np.isfinite(out).all(), name
        mass_out, _ = _mass_and_centre(out)
        assert np.abs(np.mean(mass_out / mass) - 1) < 0.03, name
        assert (mass_out / mass > 0.3).all() and (mass_out / mass < 2.5).all(), name
        out = gaussian_filter(out, (0, 0, 2, 2))
        corr = [np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in zip(out, blurred, strict=True)]
        assert np.median(corr) > least[name], name


# ----------------------------------------------------------------------------------------------
# Determinism and the generator
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_same_seed_epoch_and_ids_give_the_same_images_in_any_batch(device):
    host, ids_host = _images(64), np.arange(500, 564)
    x, ids = _on(device, host, ids_host)
    aug = NAMED["strong"]
    first = asnumpy(augment_batch(x, aug, ids, seed=7, epoch=2))
    np.testing.assert_array_equal(asnumpy(augment_batch(x, aug, ids, seed=7, epoch=2)), first)
    order = np.random.default_rng(0).permutation(64)[:20]  # another batch holding some of them
    x_sub, ids_sub = _on(device, host[order], ids_host[order])
    sub = asnumpy(augment_batch(x_sub, aug, ids_sub, seed=7, epoch=2))
    np.testing.assert_allclose(sub, first[order], atol=1e-5)
    for other in ({"seed": 8, "epoch": 2}, {"seed": 7, "epoch": 3}):
        different = asnumpy(augment_batch(x, aug, ids, **other))
        assert (np.abs(different - first).max(axis=(1, 2, 3)) > 0.1).all(), other


@pytest.mark.parametrize("device", DEVICES)
def test_noise_adds_the_scaled_normals(device):
    host, ids_host = _images(16), np.arange(16)
    x, ids = _on(device, host, ids_host)
    out = asnumpy(augment_batch(x, Augment(noise=0.1), ids, seed=1, epoch=5))
    keys = image_keys(ids, 1, 5)
    expected = host + 0.1 * asnumpy(normals(keys, STREAM_NOISE, 784)).reshape(host.shape)
    np.testing.assert_allclose(out, expected, atol=1e-6)
    assert (out - host).std() == pytest.approx(0.1, rel=0.03)


@pytest.mark.parametrize("device", DEVICES)
def test_uniforms_and_normals_have_the_right_statistics_without_warnings(device):
    (ids,) = _on(device, np.arange(1000, dtype=np.int64))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # wrapping uint64 arithmetic must stay silent
        keys = image_keys(ids, seed=2**70 + 3, epoch=-1)  # seeds of any size wrap
        u = asnumpy(uniforms(keys, STREAM_AFFINE, 100)).astype(np.float64)  # 1e5 draws
        z = asnumpy(normals(keys, STREAM_NOISE, 100)).astype(np.float64)
    assert u.min() >= 0 and u.max() < 1
    assert u.mean() == pytest.approx(0.5, abs=0.005)
    assert u.var() == pytest.approx(1 / 12, rel=0.02)
    assert z.mean() == pytest.approx(0, abs=0.01)
    assert z.std() == pytest.approx(1, abs=0.01)
    assert np.abs(z).max() < 4.72  # Box-Muller on 16-bit uniforms
    assert (np.abs(z) > 3).mean() == pytest.approx(0.0027, abs=0.0006)  # normal tails
    assert abs(np.corrcoef(u[:, 0], u[:, 1])[0, 1]) < 0.1  # draws of an image independent
    assert abs(np.corrcoef(u[:-1, 0], u[1:, 0])[0, 1]) < 0.1  # neighbouring ids too
    assert len(np.unique(asnumpy(keys))) == 1000


def test_no_host_reads_of_the_batch_or_its_draws():
    """Arrays that refuse to become Python numbers (float(), int(), bool(), .item()) go
    through every spec: augment_batch never reads back the batch, the ids or values
    derived from them (on a GPU each such read would be a synchronisation)."""

    class DeviceOnly(np.ndarray):
        def _refuse(self, *args, **kwargs):
            raise AssertionError("a host read of a device array")

        __float__ = __int__ = __index__ = __bool__ = __complex__ = item = tolist = _refuse

    x = _images(16).view(DeviceOnly)
    ids = np.arange(16, dtype=np.int64).view(DeviceOnly)
    with pytest.raises(AssertionError, match="host read"):
        float(ids[:1])  # the trap works
    for aug in NAMED.values():
        augment_batch(x, aug, ids, seed=0, epoch=1)


# ----------------------------------------------------------------------------------------------
# The elastic field
# ----------------------------------------------------------------------------------------------


def _simard_field(alpha: float, sigma: float, n: int) -> np.ndarray:
    """Simard's full-resolution field (uniform noise per pixel, Gaussian blur, times alpha),
    blurred on a larger canvas and cropped, so it has no edge effects: ``(n, 2, 28, 28)``."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(0)
    m = int(4 * sigma) + 2
    noise = rng.uniform(-1, 1, (n, 2, 28 + 2 * m, 28 + 2 * m))
    field = gaussian_filter(noise, (0, 0, sigma, sigma), mode="constant") * alpha
    return field[:, :, m:-m, m:-m]


@pytest.mark.parametrize(("alpha", "sigma"), [(34, 4), (8, 2), (20, 6), (3, 1)])
def test_elastic_field_is_smooth_and_as_strong_as_simards(alpha, sigma):
    """Neighbouring displacements differ by at most alpha / (sigma * step) (alpha / sigma**2
    for sigma >= 1); the mean absolute displacement is alpha * 0.130 / sigma, the standard
    deviation alpha * 0.163 / sigma; both, and the mean neighbour difference (the
    correlation length), match Simard's full-resolution field within 10 %."""
    aug = Augment(elastic_alpha=alpha, elastic_sigma=sigma)
    field = elastic_field(aug, image_keys(np.arange(512), 3, 0), 28, 28)  # (2, N, 28, 28)
    assert field.shape == (2, 512, 28, 28) and field.dtype == np.float32
    neighbours = np.concatenate(
        [np.abs(np.diff(field, axis=2)).ravel(), np.abs(np.diff(field, axis=3)).ravel()]
    )
    bound = alpha / (sigma * elastic_step(sigma))
    assert neighbours.max() <= bound
    assert neighbours.max() > 0.3 * bound  # the bound is not vacuous
    assert np.abs(field).mean() == pytest.approx(alpha * 0.130 / sigma, rel=0.1)
    assert field.std() == pytest.approx(alpha * 0.163 / sigma, rel=0.1)
    simard = _simard_field(alpha, sigma, 128)
    simard_neighbours = np.abs(np.diff(simard, axis=2))
    assert field.std() == pytest.approx(simard.std(), rel=0.1)
    assert neighbours.mean() == pytest.approx(simard_neighbours.mean(), rel=0.1)
    # Stationary: as strong at the border as in the middle (no zero-padded fall-off).
    edge, middle = np.abs(field[:, :, :, 0]).mean(), np.abs(field[:, :, :, 10:18]).mean()
    assert edge == pytest.approx(middle, rel=0.15)


def test_elastic_grid_is_the_affine_grid_plus_the_field():
    aug = Augment(rotate=10, scale=0.1, translate=2, elastic_alpha=34, elastic_sigma=4)
    keys = image_keys(np.arange(32), 0, 0)
    theta = affine_theta(aug, keys, 28, 28)
    both = elastic_field(aug, keys, 28, 28, theta)
    apart = sample_grid(theta, 28, 28) + elastic_field(aug, keys, 28, 28)
    np.testing.assert_allclose(both, apart, atol=2e-5)


# ----------------------------------------------------------------------------------------------
# CPU and GPU agree; cost
# ----------------------------------------------------------------------------------------------


@needs_cuda
def test_cpu_and_gpu_give_the_same_images():
    from lenet_xp.testing import cupyx as cupyx_module

    cupyx = cupyx_module()

    host, ids = _smooth_images(128), np.arange(7, 135, dtype=np.int64)
    gpu = get_device("cuda")
    x_d, ids_d = to_device(host, gpu), to_device(ids, gpu)
    keys = image_keys(ids, 3, 1)
    np.testing.assert_array_equal(asnumpy(image_keys(ids_d, 3, 1)), keys)
    keys_d = to_device(keys, gpu)
    np.testing.assert_array_equal(asnumpy(uniforms(keys_d, 0, 9)), uniforms(keys, 0, 9))
    np.testing.assert_allclose(
        asnumpy(normals(keys_d, 2, 784)), normals(keys, 2, 784), rtol=1e-6, atol=1e-6
    )
    specs = [*NAMED.values(), Augment(elastic_alpha=34), Augment(noise=0.2)]
    for aug in specs:
        cpu = augment_batch(host, aug, ids, seed=3, epoch=1)
        cuda = asnumpy(augment_batch(x_d, aug, ids_d, seed=3, epoch=1))
        np.testing.assert_allclose(cuda, cpu, atol=1e-5, err_msg=aug.spec)
    allow = getattr(cupyx, "allow_synchronize", None)
    if allow is not None:  # deprecated in CuPy; catches the synchronisations CuPy declares
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with allow(False):
                for aug in specs:
                    augment_batch(x_d, aug, ids_d, seed=3, epoch=2)


@pytest.mark.parametrize("spec", ["default,elastic=8:3", "strong", "noise=0.2", "light"])
def test_a_batch_finished_in_slices_equals_the_whole_batch(spec):
    """The CPU workers each finish (gather, noise) their slice at the whole batch's grid:
    the same bits as distorting the whole batch at once."""
    distortion = Distortion(parse_augment(spec), seed=5, epoch=3, fill=-0.42)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((37, 1, 28, 28)).astype(np.float32)
    ids = rng.permutation(1000)[:37]
    whole = distortion(x, ids)
    grid = distortion.grid(ids, 28, 28)
    parts = [slice(0, 19), slice(19, 30), slice(30, 37)]
    sliced = [distortion.finish(x[s], ids[s], None if grid is None else grid[:, s]) for s in parts]
    np.testing.assert_array_equal(np.concatenate(sliced), whole)
