"""Fakes of the services custsync talks to, real servers on loopback, for its tests."""

from __future__ import annotations

from .commercelayer import Export, FakeCommerceLayer, Import, Request

__all__ = ["Export", "FakeCommerceLayer", "Import", "Request"]
