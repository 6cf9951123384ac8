"""Using trained models: `savedmodel` (the export format: signatures and ldr_tf_export.json), `loader` (one interface
over SavedModels, training runs, pretrained names and the identity), `native` (a pair of scans -> the network grid ->
the model -> back onto the fixed scan's own grid: used by predict, compare and the serving client). The commands are
`python -m ldr_tf.export`, `ldr_tf.predict`, `ldr_tf.evaluate`, `ldr_tf.compare` and `ldr_tf.benchmark`."""
