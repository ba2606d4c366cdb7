"""stub.

x
"""
from sleep_jax.launch import common
def add_arguments(p):
  common.add_common_arguments(p, entrypoint="sleep-jax", retries=0, retries_help="")
def run(args, job):
  return 0
