"""Imaging: a CT slice from its bytes to what a model sees. Recognising the accepted input
formats by their bytes (`formats`), decoding them into one colour mode (`decoding`), refusing
what cannot be a CT slice (`screening`), the versioned lung crop and intensity
standardisation every model is trained and served with (`preprocessing`) and the benign changes
a slice goes through between hospitals (`perturbations`: training's source variants, evaluation's
robustness checks). Nothing here knows
TensorFlow, storage, access, training or evaluation: it imports only the core's foundation
(tests/core/test_layering.py), so serving, training and the data pipeline share it."""
