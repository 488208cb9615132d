// The registry of the generated code: shellinfo.v1 (with ProtectionJob) and its rest_name option,
// and the google.rpc error details. Built from the descriptors protoc-gen-es
// embeds in gen/ (`npm run generate`).

import { createRegistry } from "@bufbuild/protobuf";
import { file_google_rpc_error_details } from "../gen/google/rpc/error_details_pb.js";
import { file_shellinfo_v1_protection_job } from "../gen/shellinfo/v1/protection_job_pb.js";
import { file_shellinfo_v1_protection_shell_info } from "../gen/shellinfo/v1/protection_shell_info_pb.js";
import { file_shellinfo_v1_run_update_service } from "../gen/shellinfo/v1/run_update_service_pb.js";

export const registry = createRegistry(
  file_shellinfo_v1_protection_job,
  file_shellinfo_v1_protection_shell_info,
  file_shellinfo_v1_run_update_service,
  file_google_rpc_error_details,
);
