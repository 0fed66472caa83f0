"""Tests of the feature server (HTTP and gRPC front ends); shared fixtures in conftest.py."""
