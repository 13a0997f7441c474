"""The Python SDK: talk to an edge_sdk daemon through the MQTT broker.

    from edge_sdk import Client
    with Client(host="localhost", port=1883, device_id="jetson") as c:
        print(c.chat("Hello!", max_tokens=32, seed=0).text)

Images: ``{"type": "image", "image": path | bytes | HxWx3 uint8 RGB ndarray}`` parts (one goes as
an MQTT 5 binary payload, several as base64 in the JSON) or ``{"type": "image", "camera":
"front"}`` (the device's newest frame). ``client.watch(camera, prompt, every=2.0)`` registers a
watch job and iterates its events; ``client.snapshot(camera)`` returns a JPEG. ``AsyncClient`` has
the same methods as coroutines. The contract is edge_sdk/protocol/PROTOCOL.md.

Modules: errors, settings (``ConnectionSettings``), connection (the paho side), payloads,
streams, watch, sync (``Client``), aio (``AsyncClient``), discovery (``discover``).
"""

from edge_sdk.client.aio import AsyncClient
from edge_sdk.client.audio_stream import AudioStream
from edge_sdk.client.discovery import discover
from edge_sdk.client.errors import (BadRequestError, BrokerConnectionError, BusyError, CameraUnavailableError,
                                    DeviceOfflineError, EdgeError, InvalidAudioError, InvalidImageError, ProtocolError,
                                    RequestTimeoutError, ServerError, UnsupportedMediaError, error_from_event)
from edge_sdk.client.payloads import (build_chat_payload, build_transcribe_payload, build_watch_payload,
                                      encode_audio_input, encode_image_input, prepare_media)
from edge_sdk.client.settings import ConnectionSettings
from edge_sdk.client.streams import AsyncChatStream, ChatDelta, ChatResult, ChatStream
from edge_sdk.client.sync import Client
from edge_sdk.client.watch import AsyncWatchHandle, WatchHandle
from edge_sdk.protocol.models import Capabilities, WatchEnd, WatchError, WatchEvent, WatchRegistered

__all__ = ["Client", "AsyncClient", "AudioStream", "ChatStream", "AsyncChatStream", "ChatResult", "ChatDelta", "Capabilities",
           "ConnectionSettings", "WatchHandle", "AsyncWatchHandle", "WatchEvent", "WatchError", "WatchEnd",
           "WatchRegistered", "EdgeError", "BadRequestError", "UnsupportedMediaError", "InvalidImageError", "InvalidAudioError",
           "BusyError", "DeviceOfflineError", "CameraUnavailableError", "RequestTimeoutError", "ServerError",
           "ProtocolError", "BrokerConnectionError", "discover", "error_from_event", "build_chat_payload",
           "build_watch_payload", "encode_image_input", "prepare_media", "build_transcribe_payload",
           "encode_audio_input"]
