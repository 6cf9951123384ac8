"""Using trained models: `loader` (one interface over SavedModels, training runs, pretrained names and the identity),
`savedmodel` (the export format: signatures and ldr_tf_export.json). The commands are `python -m ldr_tf.export`,
`ldr_tf.predict`, `ldr_tf.evaluate`, `ldr_tf.compare` and `ldr_tf.benchmark`."""
