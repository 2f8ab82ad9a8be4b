"""dqt inside other training frameworks. Each module imports its framework on import, so
``import dqt`` never needs them: ``dqt.integrations.lightning`` (PyTorch Lightning,
``pip install -e ".[lightning]"``)."""
