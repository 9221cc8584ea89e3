"""Optuna's own storage test suite against PostgreSQL, with the storage exactly as study/storage.py builds it."""
import warnings

import pytest
from optuna.testing.pytest_storages import StorageTestCase

from study.storage import make_storage


class TestPostgresStorage(StorageTestCase):
    @pytest.fixture
    def storage(self, pg_databases):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            s = make_storage(pg_databases())
        yield s
        s.engine.dispose()
