"""The data: MNIST's files (:mod:`.mnist`), splits held on the training device
(:mod:`.device_split`), augmentation (:mod:`.augment`) and your own digit images
(:mod:`.images`)."""
