variable "name" {
  description = "Prefix of every resource name (lowercase letters, digits, dashes; at most 18 characters so that load balancer and target group names stay within AWS's 32)."
  type        = string
  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{0,16}[a-z0-9]$", var.name))
    error_message = "name must be 2 to 18 lowercase letters, digits or dashes, starting with a letter and not ending with a dash."
  }
}

variable "coordinator_count" {
  description = "Coordinator replicas: 3 (survives one lost) or 5 (survives two). Raft needs a majority, so an even count only adds a replica that can fail."
  type        = number
  default     = 3
  validation {
    condition     = contains([3, 5], var.coordinator_count)
    error_message = "coordinator_count must be 3 or 5."
  }
}

variable "coordinator_subnets" {
  description = "Subnets for the coordinators, one per availability zone (at least 3 zones, so that losing one zone keeps a majority). Replica i goes to subnet i mod n."
  type = list(object({
    id   = string
    cidr = string
    az   = string
  }))
  validation {
    condition     = length(distinct([for s in var.coordinator_subnets : s.az])) >= 3
    error_message = "coordinator_subnets must span at least 3 availability zones: with 2, one zone holds a majority of the replicas and losing it stops the cluster."
  }
  validation {
    condition     = length(distinct([for s in var.coordinator_subnets : s.az])) == length(var.coordinator_subnets)
    error_message = "coordinator_subnets must have one subnet per availability zone."
  }
  validation {
    condition     = alltrue([for s in var.coordinator_subnets : can(cidrhost(s.cidr, 0))])
    error_message = "every coordinator subnet needs a valid IPv4 cidr."
  }
}

variable "coordinator_host_number" {
  description = "Coordinators get fixed private addresses, so that nodes and replicas find them: host number h (plus 1 for each earlier replica in the same subnet) of their subnet. AWS reserves the first four and the last address of a subnet."
  type        = number
  default     = 10
  validation {
    condition     = var.coordinator_host_number >= 4 && var.coordinator_host_number <= 250
    error_message = "coordinator_host_number must be 4 to 250 (AWS reserves the first four addresses of a subnet)."
  }
}

variable "node_subnets" {
  description = "Public subnets for the nodes and the load balancer, one per availability zone. Nodes need public addresses: clients are redirected to their user's node directly."
  type = list(object({
    id   = string
    cidr = string
    az   = string
  }))
  validation {
    condition     = length(var.node_subnets) >= 1 && length(distinct([for s in var.node_subnets : s.az])) == length(var.node_subnets)
    error_message = "node_subnets must have at least one subnet, one per availability zone."
  }
  validation {
    condition     = alltrue([for s in var.node_subnets : can(cidrhost(s.cidr, 0))])
    error_message = "every node subnet needs a valid IPv4 cidr."
  }
}

variable "node_count" {
  description = "Nodes in the auto-scaling group: min, max and desired. Each node holds about 1/n of the shards; a replacement joins under a new node id (see docs/operations.md, Deploying)."
  type = object({
    min     = number
    max     = number
    desired = number
  })
  default = { min = 3, max = 12, desired = 3 }
  validation {
    condition     = var.node_count.min >= 1 && var.node_count.min <= var.node_count.desired && var.node_count.desired <= var.node_count.max
    error_message = "node_count needs 1 <= min <= desired <= max."
  }
  validation {
    condition     = var.node_count.max <= 1024
    error_message = "node_count.max is at most 1024 (the coordinator's member bound)."
  }
}

variable "replication_factor" {
  description = "Copies of each shard, the primary included (1 to 3), given to `ringpost-coordinator init`. At most node_count.min, so that every shard has all its copies at the group's smallest size."
  type        = number
  default     = 2
  validation {
    condition     = var.replication_factor >= 1 && var.replication_factor <= 3 && floor(var.replication_factor) == var.replication_factor
    error_message = "replication_factor must be 1, 2 or 3."
  }
  validation {
    condition     = var.replication_factor <= var.node_count.min
    error_message = "replication_factor must not exceed node_count.min: a shard gets min(factor, active nodes) copies."
  }
}

variable "shard_count" {
  description = "Shards of the cluster, fixed at `init` for its life (nodes keep it in a u16)."
  type        = number
  default     = 4096
  validation {
    condition     = var.shard_count >= 1 && var.shard_count <= 65535 && floor(var.shard_count) == var.shard_count
    error_message = "shard_count must be a whole number from 1 to 65535."
  }
}

variable "ports" {
  description = "Ports. Client listeners (ws, wss, quic, media; 0 turns one off) are opened to client_cidrs; wss and quic may share a number (TCP and UDP). The nodes' admin port (metrics, /readyz), the coordinators' admin port (coordinator_admin: metrics, /healthz) and the coordinators' client port are opened to admin_cidrs; peer (UDP) between nodes only; raft between coordinators only. media_public is the load balancer's TLS port in front of the media listener."
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
  validation {
    condition     = alltrue([for p in values(var.ports) : p >= 0 && p <= 65535 && floor(p) == p])
    error_message = "every port must be a whole number from 0 to 65535."
  }
  validation {
    condition     = alltrue([for p in [var.ports.admin, var.ports.peer, var.ports.raft, var.ports.coordinator_client, var.ports.coordinator_admin, var.ports.media_public] : p > 0])
    error_message = "admin, peer, raft, coordinator_client, coordinator_admin and media_public ports cannot be 0."
  }
  validation {
    condition     = var.ports.ws + var.ports.wss + var.ports.quic > 0
    error_message = "at least one client listener (ws, wss or quic) must be on."
  }
  validation {
    # Node TCP listeners, and node UDP listeners, must not collide.
    condition = (
      length(compact([for p in [var.ports.ws, var.ports.wss, var.ports.media, var.ports.admin] : p > 0 ? tostring(p) : ""])) ==
      length(distinct(compact([for p in [var.ports.ws, var.ports.wss, var.ports.media, var.ports.admin] : p > 0 ? tostring(p) : ""])))
      && var.ports.quic != var.ports.peer
      && length(distinct([var.ports.raft, var.ports.coordinator_client, var.ports.coordinator_admin])) == 3
    )
    error_message = "ports collide: ws, wss, media and admin (TCP) must differ, quic and peer (UDP) must differ, raft, coordinator_client and coordinator_admin must differ."
  }
  validation {
    condition     = !contains([var.ports.ws, var.ports.wss], var.ports.media_public) || var.ports.media == 0
    error_message = "media_public must differ from the ws and wss ports on the load balancer."
  }
}

variable "client_cidrs" {
  description = "Who may reach the client ports (and the media port). Keep 0.0.0.0/0 for a public service: with all egress open too, EC2 then does not track client connections, which a host with a million of them needs."
  type        = list(string)
  default     = ["0.0.0.0/0"]
  validation {
    condition     = length(var.client_cidrs) > 0 && alltrue([for c in var.client_cidrs : can(cidrhost(c, 0))])
    error_message = "client_cidrs must be a non-empty list of IPv4 CIDR blocks."
  }
}

variable "admin_cidrs" {
  description = "Who may reach the nodes' and the coordinators' admin ports (metrics, health) and the coordinators' client port (ctl, init): the monitoring hosts and operators' bastion. Never the internet."
  type        = list(string)
  validation {
    condition     = alltrue([for c in var.admin_cidrs : can(cidrhost(c, 0))])
    error_message = "admin_cidrs must be IPv4 CIDR blocks."
  }
  validation {
    condition     = alltrue([for c in var.admin_cidrs : !can(cidrhost(c, 0)) || tonumber(split("/", c)[1]) >= 8])
    error_message = "admin_cidrs must not open the admin ports to the internet (no prefix shorter than /8, so no 0.0.0.0/0)."
  }
}
