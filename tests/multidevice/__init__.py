"""Tests on 8 simulated devices (a package, so that its conftest and modules do not shadow those of tests/)."""
