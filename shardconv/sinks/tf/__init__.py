"""The TensorFlow outputs (``--to savedmodel``, ``--to tf-checkpoint --model-builder``).

``ops`` holds every TensorFlow call (imported only when a skeleton is built), ``layout`` the
``Layout`` strategies (where the files go, which checkpoint key each output gets, what the
skeleton carries over), ``savedmodel`` the sinks. ``--to tf-checkpoint`` without a builder
is ``sinks/tf_checkpoint.py``, which needs no TensorFlow.
"""
