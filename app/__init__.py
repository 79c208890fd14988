"""Quaver inference core and web service.

`app` owns the contract that training must meet: audio decoding, the prompt format, model loading,
the posterior file format and K-sample prediction. It never imports `training`.
"""
