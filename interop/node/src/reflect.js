// Build a protobuf-es registry from server reflection alone, as a client without
// the proto files would (buf curl, grpcurl and protobuf-es users do the same).

import { create, createFileRegistry, fromBinary } from "@bufbuild/protobuf";
import { FileDescriptorProtoSchema, FileDescriptorSetSchema } from "@bufbuild/protobuf/wkt";
import { connectService } from "./client.js";
import { ServerReflection } from "../gen/grpc/reflection/v1alpha/reflection_pb.js";

/**
 * The registry of the file that defines `symbol` and of everything it imports,
 * as the server at `url` reflects them.
 */
export async function reflectedRegistry(url, symbol, { token } = {}) {
  const client = connectService(ServerReflection, url, { token });
  async function* requests() {
    yield { messageRequest: { case: "fileContainingSymbol", value: symbol } };
  }
  try {
    const files = new Map();
    for await (const response of client.serverReflectionInfo(requests())) {
      const answer = response.messageResponse;
      if (answer.case === "errorResponse") throw new Error(`reflection: ${answer.value.errorMessage}`);
      if (answer.case !== "fileDescriptorResponse") throw new Error(`reflection: unexpected ${answer.case}`);
      for (const bytes of answer.value.fileDescriptorProto) {
        const file = fromBinary(FileDescriptorProtoSchema, bytes);
        files.set(file.name, file);
      }
    }
    // Dependencies first, as a FileDescriptorSet lists them.
    const ordered = [];
    const visit = (name) => {
      const file = files.get(name);
      if (!file || ordered.includes(file)) return;
      file.dependency.forEach(visit);
      ordered.push(file);
    };
    [...files.keys()].forEach(visit);
    return createFileRegistry(create(FileDescriptorSetSchema, { file: ordered }));
  } finally {
    client.close();
  }
}
