# TEMPORARY until devstack's plugin lands
import uuid

import pytest


@pytest.fixture(scope="session")
def nats_url():
    return "nats://127.0.0.1:24222"


@pytest.fixture(scope="session")
def pg_dsn():
    return "postgresql://postgres@127.0.0.1:5432/kitsmoke"


@pytest.fixture
def unique():
    return uuid.uuid4().hex[:10]
