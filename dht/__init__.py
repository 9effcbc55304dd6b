"""dht — our own Kademlia on p2p streams: routing, protocol, lookups, expiring records with sub-keys,
signatures and schemas, client mode, crawling."""
from .config import DHTConfig
from .dht import DHT, DHTBootstrapError
from .records import DHTID, Record, SubkeyEntry, ValueWithExpiration, get_dht_time, subkey_entries
from .validation import OwnerSignatureValidator, RecordValidator, SchemaValidator, ValidationError, ValueSchema

__all__ = ["DHT", "DHTBootstrapError", "DHTConfig", "DHTID", "Record", "SubkeyEntry", "ValueWithExpiration", "get_dht_time",
           "subkey_entries",
           "OwnerSignatureValidator", "RecordValidator", "SchemaValidator", "ValidationError", "ValueSchema"]
