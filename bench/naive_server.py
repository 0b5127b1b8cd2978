"""The baseline: a naive server that calls Keras `model.predict` once per request.

No batching, no ONNX, no compiled graph: what a first prototype would do. Same decoding and
the same URL shape as the real service so the load generator can drive both.

    python -m bench.naive_server --store STORE --model mobilenetv2 --port 8100
"""

from __future__ import annotations

import argparse
import os

from fastapi import FastAPI, File, UploadFile  # module level: FastAPI resolves these annotations

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--store", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--port", type=int, default=8100)
    args = parser.parse_args()

    import numpy as np
    import uvicorn

    from ctscan.imaging.decoding import decode_image, resize_for_model
    from ctscan.models import load_keras_model
    from ctscan.storage.store import open_store

    model, card = load_keras_model(open_store(args.store), args.model)
    size = card.input_size
    app = FastAPI()

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/predict")
    def predict(file: UploadFile = File(...)) -> dict[str, float]:  # noqa: B008 - FastAPI idiom
        pixels = resize_for_model(decode_image(file.file.read()).pixels, size)
        probability = float(model.predict(np.expand_dims(pixels, 0), verbose=0)[0, 0])
        return {"probability_covid": probability}

    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
