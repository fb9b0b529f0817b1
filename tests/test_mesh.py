"""The (data, fsdp, tensor) mesh sizes: -1 takes what is left, bad sizes are refused in one line."""

import jax
import pytest

from xecomla import sharding
from xecomla.cli import UsageError


@pytest.mark.parametrize('sizes, shape', [
    ((-1, 1, 1), (8, 1, 1)), ((-1, 2, 2), (2, 2, 2)), ((1, -1, 1), (1, 8, 1)),
    ((-1, -1, 2), (1, 4, 2)), ((2, -1, 1), (2, 4, 1)), ((2, 2, 2), (2, 2, 2))])
def test_mesh_sizes(sizes, shape):
  mesh = sharding.make_mesh(*sizes)
  assert tuple(mesh.shape[a] for a in sharding.MESH_AXES) == shape
  assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in jax.devices())


@pytest.mark.parametrize('sizes, words', [
    ((3, -1, 1), 'do not divide into data=3'), ((-1, 3, 1), 'do not divide into fsdp=3'),
    ((0, 1, 1), 'must be positive'), ((2, 2, 1), 'set mesh.data=-1')])
def test_bad_mesh_sizes(sizes, words):
  with pytest.raises(UsageError, match=words):
    sharding.make_mesh(*sizes)
