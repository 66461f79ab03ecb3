"""The data: MNIST's files (:mod:`.mnist`), splits held on the training device
(:mod:`.device_split`), augmentation (:mod:`.augment`) and your own digit images
(:mod:`.images`)."""

# ``from lenet_xp.data import DeviceSplit`` as before lenet_xp.data became this package
from lenet_xp.data.device_split import DeviceSplit, shift_images, to_device_split

__all__ = ["DeviceSplit", "shift_images", "to_device_split"]
