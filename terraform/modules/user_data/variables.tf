variable "role" {
  description = "node or coordinator."
  type        = string
  validation {
    condition     = contains(["node", "coordinator"], var.role)
    error_message = "role must be node or coordinator."
  }
}

variable "binary_url" {
  description = "HTTPS URL of the role's binary (ringpost-node or ringpost-coordinator, x86_64 or aarch64 Linux as the instance type needs)."
  type        = string
  validation {
    condition     = can(regex("^https://[^\\s'\"]+$", var.binary_url))
    error_message = "binary_url must be an https:// URL without quotes or spaces."
  }
}

variable "binary_sha256" {
  description = "SHA-256 of the binary, hex: the download is refused unless it matches."
  type        = string
  validation {
    condition     = can(regex("^[0-9a-f]{64}$", var.binary_sha256))
    error_message = "binary_sha256 must be 64 lowercase hex digits."
  }
}

variable "config_toml" {
  description = "The role's rendered configuration (the config module's node_toml or one of coordinator_tomls)."
  type        = string
}

variable "region" {
  description = "AWS region of the SSM parameters."
  type        = string
  validation {
    condition     = can(regex("^[a-z]{2}(-[a-z]+)+-[0-9]$", var.region))
    error_message = "region must look like eu-west-1."
  }
}

variable "file_secrets" {
  description = "Files written from SSM parameters at boot: absolute path => parameter name (the cluster secret, the TLS key and certificate). Mode 0640, group ringpost."
  type        = map(string)
  default     = {}
  validation {
    condition     = alltrue([for p, n in var.file_secrets : can(regex("^/[A-Za-z0-9_./-]+$", p)) && can(regex("^[A-Za-z0-9_./-]+$", n))])
    error_message = "file_secrets: absolute paths and parameter names of letters, digits, _ . / - only."
  }
}

variable "env_secrets" {
  description = "Node only: RINGPOST_* variables written to /etc/ringpost/node.env from SSM parameters at boot (e.g. RINGPOST_SMS_GATEWAY_TOKEN)."
  type        = map(string)
  default     = {}
  validation {
    condition     = alltrue([for k, n in var.env_secrets : can(regex("^RINGPOST_[A-Z0-9_]+$", k)) && can(regex("^[A-Za-z0-9_./-]+$", n))])
    error_message = "env_secrets: RINGPOST_* names and parameter names of letters, digits, _ . / - only."
  }
}

variable "ports" {
  description = "Node only: the ports (the topology module's `ports` output)."
  type = object({
    ws                 = optional(number, 0)
    wss                = optional(number, 443)
    quic               = optional(number, 443)
    media              = optional(number, 0)
    media_public       = optional(number, 8443)
    admin              = optional(number, 7780)
    peer               = optional(number, 7790)
    raft               = optional(number, 7400)
    coordinator_client = optional(number, 7401)
    coordinator_admin  = optional(number, 7402)
  })
  default = {}
}

variable "allow_io_uring" {
  description = "Node only: a drop-in adds io_uring's system calls to the unit's filter, which @system-service leaves out. Set it with the config module's ws_driver = \"uring\", which otherwise falls back to tokio."
  type        = bool
  default     = false
}

variable "advertise_host" {
  description = "Node only: the host name or address this node tells redirected clients to connect to, from the instance metadata at each start: {public_ipv4}, {public_ipv4_dashed} (1-2-3-4), {public_hostname}, {instance_id} are replaced. The TLS certificate must cover it, and DNS must resolve it if it is a name."
  type        = string
  default     = "{public_ipv4}"
  validation {
    condition     = can(regex("^[A-Za-z0-9.{}_-]+$", var.advertise_host))
    error_message = "advertise_host: letters, digits, . - _ and the {placeholders} only."
  }
}

variable "data_volume_id" {
  description = "Coordinator only: the EBS volume (vol-...) formatted on first use and mounted at the data directory."
  type        = string
  default     = ""
  validation {
    condition     = var.data_volume_id == "" || can(regex("^vol-[0-9a-f]+$", var.data_volume_id))
    error_message = "data_volume_id must be empty or a vol-... id."
  }
}

variable "deploy_dir" {
  description = "The repository's deploy/ directory: the units, the sysctl and nft files come from it, so there is one copy."
  type        = string
  default     = ""
}
