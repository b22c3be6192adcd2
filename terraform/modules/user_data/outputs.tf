output "cloud_config" {
  description = "The cloud-init user-data, as text."
  value       = local.cloud_config
}

output "user_data_base64" {
  description = "The user-data gzipped and base64-encoded, as aws_instance.user_data_base64 and a launch template's user_data take it."
  value       = local.user_data_base64
  precondition {
    # EC2 takes at most 16 KiB of user-data before base64.
    condition     = length(local.user_data_base64) <= 21844
    error_message = "the gzipped user-data is over EC2's 16 KiB."
  }
  precondition {
    condition     = strcontains(local.notrack_source, "define RINGPOST_TCP_PORTS = {") && strcontains(local.notrack_source, "define RINGPOST_UDP_PORTS = {")
    error_message = "deploy/ringpost-notrack.nft lost its RINGPOST_TCP_PORTS / RINGPOST_UDP_PORTS defines, which this module rewrites."
  }
}

output "files" {
  description = "The files cloud-init writes: path => content (for checks)."
  value       = { for f in local.files : f.path => f.content }
}

output "install_script" {
  description = "The first-boot install script."
  value       = local.install
}

output "instance_env_script" {
  description = "Node: the script that writes the per-instance RINGPOST_* variables from the instance metadata."
  value       = local.instance_env
}

output "notrack_rules" {
  description = "Node: the nft file with this deployment's client ports."
  value       = local.notrack_rules
}
