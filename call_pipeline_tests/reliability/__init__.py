"""Fault injection, bad input, the cloud-account limits and secrets: nothing is lost, nothing is
duplicated, and no secret leaks (see invariant.py for the comparison every fault test makes)."""
