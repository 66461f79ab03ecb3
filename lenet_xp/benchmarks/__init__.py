"""What ``python -m lenet_xp.bench`` measures against: PyTorch's LeNet-5
(:mod:`.torch_reference`)."""
