"""The networks: LeNet-5 (:mod:`.lenet5`), the presets (:mod:`.presets`), feature maps and
filter pictures (:mod:`.feature_maps`) and the ONNX graph (:mod:`.onnx`)."""
