"""The Python SDK: talk to an edge_sdk daemon through the MQTT broker.

    from edge_sdk import Client
    with Client(host="localhost", port=1883, device_id="jetson") as c:
        print(c.chat("Hello!", max_tokens=32, seed=0).text)

Images: ``{"type": "image", "image": path | bytes | HxWx3 uint8 RGB ndarray}`` parts (one goes as
an MQTT 5 binary payload, several as base64 in the JSON) or ``{"type": "image", "camera":
"front"}`` (the device's newest frame). ``client.watch(camera, prompt, every=2.0)`` registers a
watch job and iterates its events; ``client.snapshot(camera)`` returns a JPEG. Speech:
``client.transcribe(audio)``, audio parts in chat, ``client.audio_stream()`` (push microphone
chunks, read voice events and transcripts) and ``client.listen(microphone)`` (a listen job on a
microphone the device owns). ``AsyncClient`` has the same methods as coroutines. The contract is
edge_sdk/protocol/PROTOCOL.md.

Modules: errors, settings (``ConnectionSettings``), connection (the paho side), payloads,
streams, jobs (watch and listen), audio_stream, sync (``Client``), aio (``AsyncClient``),
discovery (``discover``).
"""

from edge_sdk.client.aio import AsyncClient
from edge_sdk.client.audio_stream import AsyncAudioStream, AudioStream
from edge_sdk.client.discovery import discover
from edge_sdk.client.errors import (BadRequestError, BrokerConnectionError, BusyError, CameraUnavailableError,
                                    DeviceOfflineError, EdgeError, InvalidAudioError, InvalidImageError, ProtocolError,
                                    RequestTimeoutError, ServerError, UnsupportedMediaError, error_from_event)
from edge_sdk.client.payloads import (build_chat_payload, build_listen_payload, build_transcribe_payload,
                                      build_watch_payload, encode_audio_input, encode_image_input, prepare_media)
from edge_sdk.client.settings import ConnectionSettings
from edge_sdk.client.streams import AsyncChatStream, ChatDelta, ChatResult, ChatStream
from edge_sdk.client.sync import Client
from edge_sdk.client.jobs import AsyncJobHandle, JobHandle
from edge_sdk.protocol.models import (Capabilities, ListenEnd, ListenError, ListenRegistered, ListenTranscript, ListenVoice,
                                      WatchEnd, WatchError, WatchEvent, WatchRegistered)

__all__ = ["Client", "AsyncClient", "AudioStream", "AsyncAudioStream", "ChatStream", "AsyncChatStream", "ChatResult",
           "ChatDelta", "Capabilities", "ConnectionSettings", "JobHandle", "AsyncJobHandle", "WatchEvent", "WatchError",
           "WatchEnd", "WatchRegistered", "ListenVoice", "ListenTranscript", "ListenError", "ListenEnd",
           "ListenRegistered", "build_listen_payload", "EdgeError", "BadRequestError", "UnsupportedMediaError", "InvalidImageError", "InvalidAudioError",
           "BusyError", "DeviceOfflineError", "CameraUnavailableError", "RequestTimeoutError", "ServerError",
           "ProtocolError", "BrokerConnectionError", "discover", "error_from_event", "build_chat_payload",
           "build_watch_payload", "encode_image_input", "prepare_media", "build_transcribe_payload",
           "encode_audio_input"]
