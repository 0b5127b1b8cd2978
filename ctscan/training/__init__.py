"""Training: how a network learns from a data set. A training run with its checkpoints, resume,
model selection on val and the card it leaves (`runs`), the Keras callbacks the run hands to
`fit` (`callbacks`: they never import the run) and the hyper-parameters a job may set, checked
the same way at submit and in the worker (`hyperparameters`: plain pydantic, no TensorFlow, so
the web and the jobs API check them too). It imports the foundation, imaging, the models layer
and the data pipeline; never serving, storage, evaluation or publishing, and no web or queue
framework (tests/core/test_layering.py)."""
