"""Keras (torch backend): a tiny Dense model fit on random data, verbose=1."""

import os

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras
import numpy as np

rng = np.random.default_rng(0)
x = rng.normal(size=(160, 8)).astype("float32")
y = rng.normal(size=(160, 1)).astype("float32")
model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"),
                          keras.layers.Dense(1)])
model.compile(optimizer="sgd", loss="mse")
model.fit(x, y, batch_size=16, epochs=2, verbose=1)
