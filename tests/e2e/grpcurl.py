#!/usr/bin/python3
"""A gRPC client that sees a server the way grpcurl does: through server reflection only.

No .proto file of the server is needed. The client asks the server's reflection service
(grpc.reflection.v1alpha, the version the Debian build of gRPC 1.51 serves) for its services
and file descriptors, builds message classes from them, and calls methods with JSON in and
JSON out.

JSON output uses the proto field names (``vm_id``, not ``vmId``) and includes fields that hold
their default value, so callers can index any field; 64-bit integers are strings, as in
proto3 JSON. Input accepts either spelling of field names.

Library use::

    with Client("unix:///run/vmnetd.sock") as client:
        client.list_services()
        print(client.describe("vmnet.v1.VmNetwork"))
        client.call("vmnet.v1.VmNetwork/ListRoutes", {})
        with client.stream("vmnet.v1.VmNetwork/Watch", {}, each="events") as events:
            for event in events: ...  # each event of each WatchResponse

Command line (run with /usr/bin/python3, which has python3-grpcio)::

    grpcurl.py unix:///path list
    grpcurl.py unix:///path describe vmnet.v1.VmNetwork
    grpcurl.py unix:///path call vmnet.v1.VmNetwork/ListArp '{}'
"""

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import threading

import grpc
from google.protobuf import (descriptor, descriptor_pb2, descriptor_pool, json_format,
                             message_factory)

REFLECTION_PROTO = "grpc/reflection/v1alpha/reflection.proto"
REFLECTION_METHOD = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
GRPC_PROTO_DIR = "/usr/share/grpc-proto"
DEFAULT_TIMEOUT = 10.0


class RpcError(Exception):
    """A call that ended with a status other than OK; carries the gRPC code and details."""

    def __init__(self, code, details):
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class DescriptorError(Exception):
    """The server's reflection service could not describe what was asked for."""


def load_proto(proto_file, include_dir=GRPC_PROTO_DIR):
    """Compiles `proto_file` (relative to `include_dir`) with protoc into a new descriptor pool."""
    with tempfile.TemporaryDirectory(prefix="vmnt-protoc-") as out_dir:
        out = os.path.join(out_dir, "descriptor_set.pb")
        subprocess.run(
            ["protoc", f"-I{include_dir}", "--include_imports", f"--descriptor_set_out={out}",
             proto_file],
            check=True, capture_output=True, text=True)
        with open(out, "rb") as f:
            file_set = descriptor_pb2.FileDescriptorSet.FromString(f.read())
    pool = descriptor_pool.DescriptorPool()
    for file_proto in file_set.file:  # protoc writes dependencies first
        pool.AddSerializedFile(file_proto.SerializeToString())
    return pool


def message_class(pool, full_name):
    """The Python class of message `full_name` from `pool`."""
    desc = pool.FindMessageTypeByName(full_name)
    get_class = getattr(message_factory, "GetMessageClass", None)  # protobuf >= 4.24
    if get_class is not None:
        return get_class(desc)
    return message_factory.MessageFactory(pool).GetPrototype(desc)


def to_dict(message):
    """A message as JSON-ready dict: proto field names, default values included."""
    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, including_default_value_fields=True)


def split_method(method):
    """'pkg.Service/Method' or 'pkg.Service.Method' -> ('pkg.Service', 'Method')."""
    service, sep, name = method.rpartition("/")
    if not sep:
        service, _, name = method.rpartition(".")
    if not service or not name:
        raise ValueError(f"method {method!r} is not of the form package.Service/Method")
    return service, name


@functools.lru_cache(maxsize=None)
def _reflection_messages():
    """The reflection request and response classes, compiled from the grpc-proto package."""
    pool = load_proto(REFLECTION_PROTO)
    return (message_class(pool, "grpc.reflection.v1alpha.ServerReflectionRequest"),
            message_class(pool, "grpc.reflection.v1alpha.ServerReflectionResponse"))


class Stream:
    """The messages of a server-streaming call as JSON dicts; cancel() or leave `with` to end it.
    With `each` (a repeated field's name), the items of that field of every message instead,
    in order: vmnetd's Watch sends several events per message (each="events"); its progress
    messages, which hold no events, then yield nothing."""

    def __init__(self, call, each=None):
        self._call = call
        self._each = each

    def __iter__(self):
        try:
            for message in self._call:
                if self._each is None:
                    yield to_dict(message)
                else:
                    yield from to_dict(message)[self._each]
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.CANCELLED:
                raise RpcError(e.code(), e.details()) from None

    def cancel(self):
        self._call.cancel()

    def wait_for_headers(self, timeout=DEFAULT_TIMEOUT):
        """Waits until the server sent the response headers (initial metadata) or ended the
        call; True then, False after `timeout` seconds. A server that sends its headers once
        the stream is set up (vmnetd's Watch) lets a client know it misses no later message."""
        done = threading.Event()

        def wait():
            self._call.initial_metadata()  # blocks; returns too when the call ends
            done.set()

        threading.Thread(target=wait, daemon=True).start()
        return done.wait(timeout)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.cancel()


class Client:
    """A reflection-driven client for one server, e.g. Client("unix:///run/vmnetd.sock")."""

    def __init__(self, target, timeout=DEFAULT_TIMEOUT, options=()):
        """`options`: gRPC channel arguments, e.g. [("grpc.http2.bdp_probe", 0)]."""
        self.target = target
        self.timeout = timeout
        self._channel = grpc.insecure_channel(target, options=list(options))
        self._pool = descriptor_pool.DescriptorPool()
        self._loaded_files = set()

    def close(self):
        self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- reflection ---------------------------------------------------------------------------

    def _reflect(self, **request_fields):
        """Sends one ServerReflectionRequest and returns its response."""
        request_class, response_class = _reflection_messages()
        info = self._channel.stream_stream(
            REFLECTION_METHOD,
            request_serializer=request_class.SerializeToString,
            response_deserializer=response_class.FromString)
        try:
            responses = list(info(iter([request_class(**request_fields)]), timeout=self.timeout))
        except grpc.RpcError as e:
            raise RpcError(e.code(), e.details()) from None
        if len(responses) != 1:
            raise DescriptorError(f"reflection answered {request_fields} with "
                                  f"{len(responses)} responses")
        response = responses[0]
        if response.WhichOneof("message_response") == "error_response":
            error = response.error_response
            raise RpcError(_status_code(error.error_code), f"reflection: {error.error_message}")
        return response

    def list_services(self):
        """The sorted full names of the services the server offers."""
        response = self._reflect(list_services="*")
        return sorted(s.name for s in response.list_services_response.service)

    def _load_files(self, **request_fields):
        """Asks for a file (and its dependencies) and adds every new one to the pool."""
        response = self._reflect(**request_fields)
        files = {}
        for raw in response.file_descriptor_response.file_descriptor_proto:
            file_proto = descriptor_pb2.FileDescriptorProto.FromString(raw)
            files[file_proto.name] = file_proto
        for name in files:
            self._add_file(name, files)

    def _add_file(self, name, files):
        """Adds file `name` after its dependencies, fetching any the server did not send."""
        if name in self._loaded_files:
            return
        if name not in files:
            self._load_files(file_by_filename=name)
            return
        for dependency in files[name].dependency:
            self._add_file(dependency, files)
        self._pool.AddSerializedFile(files[name].SerializeToString())
        self._loaded_files.add(name)

    def find_symbol(self, symbol):
        """The descriptor of a service, method, message or enum, fetched on first use."""
        symbol = symbol.lstrip(".")
        found = self._find_in_pool(symbol)
        if found is None:
            self._load_files(file_containing_symbol=symbol)
            found = self._find_in_pool(symbol)
        if found is None:
            raise DescriptorError(f"symbol {symbol} not found in the server's descriptors")
        return found

    def _find_in_pool(self, symbol):
        finders = (self._pool.FindServiceByName, self._pool.FindMessageTypeByName,
                   self._pool.FindEnumTypeByName, self._pool.FindMethodByName)
        for find in finders:
            try:
                return find(symbol)
            except KeyError:
                continue
        return None

    def describe(self, symbol):
        """grpcurl-like text describing a service, method, message or enum."""
        desc = self.find_symbol(symbol)
        if isinstance(desc, descriptor.ServiceDescriptor):
            return _describe_service(desc)
        if isinstance(desc, descriptor.MethodDescriptor):
            return f"{desc.full_name} is a method:\n{_method_line(desc)}"
        if isinstance(desc, descriptor.EnumDescriptor):
            return _describe_enum(desc)
        return _describe_message(desc)

    def method(self, method):
        """The MethodDescriptor of 'pkg.Service/Method' and whether it streams (client, server)."""
        service_name, name = split_method(method)
        service = self.find_symbol(service_name)
        if not isinstance(service, descriptor.ServiceDescriptor):
            raise DescriptorError(f"{service_name} is not a service")
        method_desc = service.methods_by_name.get(name)
        if method_desc is None:
            raise DescriptorError(f"service {service_name} has no method {name}")
        return method_desc, _streaming(method_desc)

    # -- calls --------------------------------------------------------------------------------

    def _prepare(self, method, request, server_streaming):
        method_desc, (client_streams, server_streams) = self.method(method)
        if client_streams or server_streams != server_streaming:
            kind = "a server-streaming" if server_streaming else "a unary"
            raise DescriptorError(f"{method_desc.full_name} is not {kind} method")
        request_class = message_class(self._pool, method_desc.input_type.full_name)
        response_class = message_class(self._pool, method_desc.output_type.full_name)
        message = json_format.ParseDict(request, request_class())
        path = f"/{method_desc.containing_service.full_name}/{method_desc.name}"
        return path, message, request_class, response_class

    def call(self, method, request=None, timeout=None):
        """Calls a unary method with a JSON dict; returns the response dict or raises RpcError."""
        path, message, request_class, response_class = self._prepare(method, request or {}, False)
        stub = self._channel.unary_unary(
            path, request_serializer=request_class.SerializeToString,
            response_deserializer=response_class.FromString)
        try:
            return to_dict(stub(message, timeout=timeout or self.timeout))
        except grpc.RpcError as e:
            raise RpcError(e.code(), e.details()) from None

    def stream(self, method, request=None, timeout=None, each=None):
        """Starts a server-streaming call; returns a Stream of JSON dicts (no default deadline);
        `each`: see Stream."""
        path, message, request_class, response_class = self._prepare(method, request or {}, True)
        stub = self._channel.unary_stream(
            path, request_serializer=request_class.SerializeToString,
            response_deserializer=response_class.FromString)
        return Stream(stub(message, timeout=timeout), each=each)


def _status_code(number):
    """The grpc.StatusCode of a numeric code (UNKNOWN when out of range)."""
    for code in grpc.StatusCode:
        if code.value[0] == number:
            return code
    return grpc.StatusCode.UNKNOWN


def _streaming(method_desc):
    """(client_streaming, server_streaming) of a method, read from its service's proto form."""
    service_proto = descriptor_pb2.ServiceDescriptorProto()
    method_desc.containing_service.CopyToProto(service_proto)
    for m in service_proto.method:
        if m.name == method_desc.name:
            return m.client_streaming, m.server_streaming
    return False, False


def _method_line(method_desc):
    client_streams, server_streams = _streaming(method_desc)
    request = ("stream ." if client_streams else ".") + method_desc.input_type.full_name
    response = ("stream ." if server_streams else ".") + method_desc.output_type.full_name
    return f"rpc {method_desc.name} ( {request} ) returns ( {response} );"


def _describe_service(service):
    lines = [f"{service.full_name} is a service:", f"service {service.name} {{"]
    lines += [f"  {_method_line(m)}" for m in service.methods]
    return "\n".join(lines + ["}"])


_SCALAR_TYPE_NAMES = {
    value: name[len("TYPE_"):].lower()
    for name, value in vars(descriptor.FieldDescriptor).items() if name.startswith("TYPE_")
}


def _field_line(field):
    if field.message_type is not None:
        type_name = "." + field.message_type.full_name
    elif field.enum_type is not None:
        type_name = "." + field.enum_type.full_name
    else:
        type_name = _SCALAR_TYPE_NAMES[field.type]
    label = "repeated " if field.label == descriptor.FieldDescriptor.LABEL_REPEATED else ""
    return f"{label}{type_name} {field.name} = {field.number};"


def _describe_message(message):
    lines = [f"{message.full_name} is a message:", f"message {message.name} {{"]
    lines += [f"  {_field_line(f)}" for f in message.fields]
    return "\n".join(lines + ["}"])


def _describe_enum(enum):
    lines = [f"{enum.full_name} is an enum:", f"enum {enum.name} {{"]
    lines += [f"  {v.name} = {v.number};" for v in enum.values]
    return "\n".join(lines + ["}"])


def main(argv=None):
    parser = argparse.ArgumentParser(description="grpcurl-like client that needs no .proto files")
    parser.add_argument("target", help="e.g. unix:///run/vmnetd.sock or localhost:50051")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list services")
    describe = sub.add_parser("describe", help="describe a symbol")
    describe.add_argument("symbol")
    call = sub.add_parser("call", help="call a method with JSON input")
    call.add_argument("method", help="package.Service/Method")
    call.add_argument("data", nargs="?", default="{}", help="JSON request")
    args = parser.parse_args(argv)

    with Client(args.target) as client:
        try:
            if args.command == "list":
                print("\n".join(client.list_services()))
            elif args.command == "describe":
                print(client.describe(args.symbol))
            elif client.method(args.method)[1][1]:
                with client.stream(args.method, json.loads(args.data)) as events:
                    for event in events:
                        print(json.dumps(event, indent=2), flush=True)
            else:
                print(json.dumps(client.call(args.method, json.loads(args.data)), indent=2))
        except RpcError as e:
            print(f"ERROR:\n  Code: {e.code.name}\n  Message: {e.details}", file=sys.stderr)
            return 1
        except DescriptorError as e:
            print(f"Error: {e}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
