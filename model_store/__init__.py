"""Immutable, verified model versions with movable aliases (see store.py for the layout)."""
from model_store.cache import BlobCache, CacheStats, default_cache_dir
from model_store.errors import IntegrityError, NotFound, StoreError, VersionExists
from model_store.manifest import (ExportInfo, FileEntry, LatencyProfile, Manifest, SamplingSettings,
                                  SourceCheckpoint)
from model_store.store import DEFAULT_ALIAS, LoadedVersion, ModelStore, default_store_uri

__all__ = ["DEFAULT_ALIAS", "BlobCache", "CacheStats", "ExportInfo", "FileEntry", "IntegrityError", "LatencyProfile",
           "LoadedVersion", "Manifest", "ModelStore", "NotFound", "SamplingSettings", "SourceCheckpoint",
           "StoreError", "VersionExists", "default_cache_dir", "default_store_uri"]
