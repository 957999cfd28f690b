"""The data: dataset specs and builders, augmentation and the tf.data input pipelines.

TensorFlow lives here and nowhere else in the package; nothing here imports the model.
"""
