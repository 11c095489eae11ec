//! Every flag and command of fleetctl, defined once: parsing, `--help` and the shell
//! completions (`fleetctl completion`) all come from these definitions.
//!
//! Names, defaults and environment variables follow fleet v1.0: each global flag can also be
//! given as `FLEETCTL_<FLAG>` (upper case, `-` → `_`); an empty variable counts as unset.

use clap::{ArgAction, Args, CommandFactory, Parser, Subcommand, ValueEnum};
use clap_complete::Shell;

/// fleet's API socket, the default `--endpoint` of the `API` driver.
pub const DEFAULT_ENDPOINT: &str = "unix:///var/run/fleet.sock";
/// Where an etcd is looked for when `--driver=etcd` is used without `--endpoint`.
pub const DEFAULT_ETCD_ENDPOINTS: &str = "http://127.0.0.1:2379,http://127.0.0.1:4001";
pub use fleet_registry::DEFAULT_KEY_PREFIX;
/// Default columns of `list-units`.
pub const LIST_UNITS_FIELDS: &str = "unit,machine,active,sub";
/// Default columns of `list-unit-files`.
pub const LIST_UNIT_FILES_FIELDS: &str = "unit,hash,dstate,state,target";
/// Default columns of `list-machines`.
pub const LIST_MACHINES_FIELDS: &str = "machine,ip,metadata";

const ROOT_TEMPLATE: &str = "\
NAME:
{tab}{name} - {about}

USAGE:
{tab}{usage}

VERSION:
{tab}{version}

{all-args}{after-help}";

const SUB_TEMPLATE: &str = "\
NAME:
{tab}{bin} - {about}

USAGE:
{tab}{usage}

{all-args}{after-help}";

/// fleetctl's command line.
#[derive(Parser, Debug)]
#[command(
    name = "fleetctl",
    version,
    about = "fleetctl is a command-line interface to fleet, the cluster-wide init system",
    disable_version_flag = true,
    disable_help_flag = true,
    infer_subcommands = true,
    subcommand_value_name = "COMMAND",
    subcommand_help_heading = "COMMANDS",
    next_help_heading = "GLOBAL OPTIONS"
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Flags accepted before or after any command.
#[derive(Args, Debug, Clone)]
pub struct GlobalArgs {
    /// Log debug information to stderr
    #[arg(long, global = true, env = "FLEETCTL_DEBUG", value_parser = go_bool)]
    pub debug: bool,

    /// Print the version and exit
    #[arg(long, short = 'v', global = true)]
    pub version: bool,

    /// Print usage information and exit
    #[arg(long, short = 'h', global = true, action = ArgAction::Help)]
    pub help: Option<bool>,

    /// How to reach the cluster: "API" (fleet's HTTP API) or "etcd" (etcd directly)
    /// [default: API; etcd when --endpoint names port 2379 or 4001]
    #[arg(long, global = true, env = "FLEETCTL_DRIVER", value_name = "DRIVER")]
    pub driver: Option<String>,

    /// fleet API address with the API driver, or etcd address(es), comma-separated, with the
    /// etcd driver [default: unix:///var/run/fleet.sock]
    #[arg(long, global = true, env = "FLEETCTL_ENDPOINT", value_name = "URL")]
    pub endpoint: Option<String>,

    /// Key prefix of fleet's data in etcd (for development only)
    #[arg(long, global = true, env = "FLEETCTL_ETCD_KEY_PREFIX", default_value = DEFAULT_KEY_PREFIX, value_name = "PREFIX")]
    pub etcd_key_prefix: String,

    /// TLS private key for the fleet API or etcd
    #[arg(long, global = true, env = "FLEETCTL_KEY_FILE", value_name = "FILE")]
    pub key_file: Option<String>,

    /// TLS certificate for the fleet API or etcd
    #[arg(long, global = true, env = "FLEETCTL_CERT_FILE", value_name = "FILE")]
    pub cert_file: Option<String>,

    /// TLS certificate authority for the fleet API or etcd
    #[arg(long, global = true, env = "FLEETCTL_CA_FILE", value_name = "FILE")]
    pub ca_file: Option<String>,

    /// Where the host keys of machines are remembered (unused without strict host key checking)
    #[arg(long, global = true, env = "FLEETCTL_KNOWN_HOSTS_FILE", default_value = fleet_ssh::DEFAULT_KNOWN_HOSTS_FILE, value_name = "FILE")]
    pub known_hosts_file: String,

    /// Check the host keys of machines before connecting to them over SSH
    #[arg(long, global = true, env = "FLEETCTL_STRICT_HOST_KEY_CHECKING", action = ArgAction::Set,
          num_args = 0..=1, require_equals = true, default_value_t = true, default_missing_value = "true",
          value_name = "BOOL", value_parser = go_bool)]
    pub strict_host_key_checking: bool,

    /// Seconds allowed for setting up an SSH connection
    #[arg(
        long,
        global = true,
        env = "FLEETCTL_SSH_TIMEOUT",
        default_value_t = 10.0,
        value_name = "SECONDS"
    )]
    pub ssh_timeout: f64,

    /// Reach fleet and etcd through an SSH tunnel to this host[:port]
    #[arg(long, global = true, env = "FLEETCTL_TUNNEL", value_name = "ADDRESS")]
    pub tunnel: Option<String>,

    /// Seconds one request to the fleet API or etcd may wait for its answer to start
    #[arg(
        long,
        global = true,
        env = "FLEETCTL_REQUEST_TIMEOUT",
        default_value_t = 3.0,
        value_name = "SECONDS"
    )]
    pub request_timeout: f64,

    /// User to log in as on cluster machines
    #[arg(long, global = true, env = "FLEETCTL_SSH_USERNAME", default_value = fleet_ssh::DEFAULT_USER, value_name = "USER")]
    pub ssh_username: String,

    /// Private key for SSH, tried before the keys of ssh-agent
    #[arg(
        long,
        global = true,
        env = "FLEETCTL_SSH_IDENTITY",
        value_name = "FILE"
    )]
    pub identity_file: Option<String>,

    /// Deprecated, without effect: fleet's `false` gave the etcd driver the local etcd endpoints,
    /// which it uses here whenever --endpoint is not given
    #[arg(long, global = true, hide = true, env = "FLEETCTL_EXPERIMENTAL_API", action = ArgAction::Set,
          num_args = 0..=1, require_equals = true, default_value_t = true, default_missing_value = "true",
          value_parser = go_bool)]
    pub experimental_api: bool,

    /// Deprecated spelling of --key-file
    #[arg(long, global = true, hide = true, env = "FLEETCTL_ETCD_KEYFILE")]
    pub etcd_keyfile: Option<String>,

    /// Deprecated spelling of --cert-file
    #[arg(long, global = true, hide = true, env = "FLEETCTL_ETCD_CERTFILE")]
    pub etcd_certfile: Option<String>,

    /// Deprecated spelling of --ca-file
    #[arg(long, global = true, hide = true, env = "FLEETCTL_ETCD_CAFILE")]
    pub etcd_cafile: Option<String>,
}

/// Go's `strconv.ParseBool`, which fleet used for boolean flags and variables.
fn go_bool(s: &str) -> Result<bool, String> {
    match s {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Ok(false),
        _ => Err(format!("invalid boolean value {s:?}")),
    }
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Print the contents of a unit as stored in the cluster
    Cat(CatArgs),
    /// Remove one or more units from the cluster entirely
    Destroy(DestroyArgs),
    /// Relay stdin and stdout to a unix socket (used by --tunnel, not meant for users)
    FdForward(FdForwardArgs),
    /// Follow the cluster's events: units, their states and placements, machines
    Events(EventsArgs),
    /// Print a unit's journal from the machine it runs on
    Journal(JournalArgs),
    /// List the machines currently in the cluster
    ListMachines(ListMachinesArgs),
    /// List the units in the cluster, whether scheduled or not
    ListUnitFiles(ListUnitFilesArgs),
    /// List the units in the cluster as their machines report them
    ListUnits(ListUnitsArgs),
    /// Schedule units onto machines without starting them, submitting them first if needed
    Load(StartArgs),
    /// Restart units one after the other, waiting for each to be running again
    Restart(RestartArgs),
    /// Open a shell, or run a command, on a machine of the cluster
    Ssh(SshArgs),
    /// Start units in the cluster, submitting and loading them first if needed
    Start(StartArgs),
    /// Print systemd's status of units from the machines they run on
    Status(StatusArgs),
    /// Stop units in the cluster, keeping them scheduled
    Stop(DestroyArgs),
    /// Upload units to the cluster without scheduling or starting them
    Submit(SubmitArgs),
    /// Unschedule units from their machines
    Unload(DestroyArgs),
    /// Copy a fleet v1.0 cluster's units and machine metadata from its etcd v2 registry
    #[command(name = "import-v1")]
    ImportV1(ImportV1Args),
    /// Deprecated: signed units are no longer supported
    #[command(hide = true)]
    Verify(VerifyArgs),
    /// Print the version and exit
    Version,
    /// Print a shell completion script for fleetctl
    Completion(CompletionArgs),
}

/// How long blocking commands wait.
#[derive(Args, Debug, Clone, Default)]
pub struct BlockArgs {
    /// Give up waiting after N attempts of about two seconds each; 0 waits without limit.
    /// Global units are never waited for
    #[arg(
        long,
        default_value_t = 0,
        value_name = "N",
        allow_negative_numbers = true
    )]
    pub block_attempts: i64,

    /// Return as soon as the change is recorded, without waiting for the cluster to act on it
    #[arg(long)]
    pub no_block: bool,
}

/// `--sign` was fleet's signed-units feature, removed before v1.0.
#[derive(Args, Debug, Clone, Default)]
pub struct SignArg {
    /// Deprecated: signed units are no longer supported
    #[arg(long, hide = true)]
    pub sign: bool,
}

#[derive(Args, Debug)]
pub struct CatArgs {
    #[arg(value_name = "UNIT")]
    pub units: Vec<String>,
}

/// The arguments of `destroy`, `stop` and `unload`, which take the same flags.
#[derive(Args, Debug)]
pub struct DestroyArgs {
    #[command(flatten)]
    pub block: BlockArgs,
    #[arg(value_name = "UNIT")]
    pub units: Vec<String>,
}

#[derive(Args, Debug)]
pub struct FdForwardArgs {
    #[arg(value_name = "SOCKET")]
    pub socket: Vec<String>,
}

#[derive(Args, Debug)]
pub struct JournalArgs {
    /// How many of the most recent lines to print
    #[arg(
        long,
        default_value_t = 10,
        value_name = "N",
        allow_negative_numbers = true
    )]
    pub lines: i64,

    /// Keep printing new entries as they arrive
    #[arg(long, short = 'f')]
    pub follow: bool,

    /// SSH port of the machines
    #[arg(long, default_value_t = 22, value_name = "N")]
    pub ssh_port: u16,

    /// Run journalctl through sudo
    #[arg(long)]
    pub sudo: bool,

    /// journalctl's output mode, passed through unchanged
    #[arg(long, default_value = "short", value_name = "MODE")]
    pub output: String,

    #[arg(value_name = "UNIT")]
    pub units: Vec<String>,
}

/// Output format of the list commands.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OutputFormat {
    /// Tab-aligned columns, as fleet printed them
    #[default]
    Table,
    /// A JSON array with every field of every row (ignores --fields, --full, --no-legend)
    Json,
}

#[derive(Args, Debug, Clone)]
pub struct ListArgs {
    /// Show whole machine IDs and hashes
    #[arg(long, short = 'l')]
    pub full: bool,

    /// Leave out the header line
    #[arg(long)]
    pub no_legend: bool,

    /// Output format
    #[arg(long, short = 'o', value_enum, default_value_t = OutputFormat::Table, value_name = "FORMAT")]
    pub output: OutputFormat,
}

#[derive(Args, Debug)]
pub struct ListMachinesArgs {
    #[command(flatten)]
    pub list: ListArgs,
    /// Keep the list on screen, redrawn whenever something changes
    #[arg(long, short = 'w')]
    pub watch: bool,
    /// Columns to print, comma-separated; valid: machine, ip, metadata
    #[arg(long, default_value = LIST_MACHINES_FIELDS, value_name = "FIELDS")]
    pub fields: String,
}

#[derive(Args, Debug)]
pub struct ListUnitFilesArgs {
    #[command(flatten)]
    pub list: ListArgs,
    /// Columns to print, comma-separated; valid: desc, dstate, global, hash, reason, state,
    /// target, tmachine (deprecated), unit
    #[arg(long, default_value = LIST_UNIT_FILES_FIELDS, value_name = "FIELDS")]
    pub fields: String,
}

#[derive(Args, Debug)]
pub struct EventsArgs {
    /// Start after this etcd revision (resume where an earlier stream left off)
    #[arg(long, value_name = "REV")]
    pub since: Option<i64>,
    /// Only events of units whose name matches this glob (machine events are left out)
    #[arg(long, value_name = "GLOB")]
    pub unit: Option<String>,
    /// Only events about machines whose ID starts with this
    #[arg(long, value_name = "ID")]
    pub machine: Option<String>,
    /// Output format: text lines, or one JSON object per line
    #[arg(long, short = 'o', value_enum, default_value_t = EventsFormat::Text, value_name = "FORMAT")]
    pub output: EventsFormat,
}

/// How `fleetctl events` prints.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EventsFormat {
    /// One line per event: revision, unit or machine, what happened
    #[default]
    Text,
    /// One JSON object per line, as the API sends it
    Json,
}

#[derive(Args, Debug)]
pub struct ListUnitsArgs {
    #[command(flatten)]
    pub list: ListArgs,
    /// Keep the list on screen, redrawn whenever something changes
    #[arg(long, short = 'w')]
    pub watch: bool,
    /// Columns to print, comma-separated; valid: active, hash, load, machine, sub, unit
    #[arg(long, default_value = LIST_UNITS_FIELDS, value_name = "FIELDS")]
    pub fields: String,
}

#[derive(Args, Debug)]
pub struct RestartArgs {
    /// Give up waiting after N attempts of about two seconds each; 0 waits without limit
    #[arg(
        long,
        default_value_t = 0,
        value_name = "N",
        allow_negative_numbers = true
    )]
    pub block_attempts: i64,
    /// SSH port of the machines (used for global units)
    #[arg(long, default_value_t = 22, value_name = "N")]
    pub ssh_port: u16,
    #[arg(value_name = "UNIT")]
    pub units: Vec<String>,
}

#[derive(Args, Debug)]
pub struct SshArgs {
    /// Forward the local ssh-agent to the machine
    #[arg(long, short = 'A')]
    pub forward_agent: bool,

    /// SSH port of the machines
    #[arg(long, default_value_t = 22, value_name = "N")]
    pub ssh_port: u16,

    /// Connect to the machine with this ID (or ID prefix)
    #[arg(long, short = 'm', value_name = "MACHINE")]
    pub machine: Option<String>,

    /// Connect to the machine running this unit
    #[arg(long, short = 'u', value_name = "UNIT")]
    pub unit: Option<String>,

    /// A machine ID (prefix) or unit name, unless --machine or --unit is given, then the
    /// command to run (after `--` if it has flags of its own)
    #[arg(
        value_name = "MACHINE|UNIT",
        trailing_var_arg = true,
        allow_hyphen_values = true
    )]
    pub args: Vec<String>,
}

/// The arguments of `load` and `start`, which take the same flags.
#[derive(Args, Debug)]
pub struct StartArgs {
    #[command(flatten)]
    pub block: BlockArgs,
    /// Replace units already in the cluster whose content differs from the local files
    #[arg(long)]
    pub replace: bool,
    #[command(flatten)]
    pub sign: SignArg,
    #[arg(value_name = "UNIT")]
    pub units: Vec<String>,
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// SSH port of the machines
    #[arg(long, default_value_t = 22, value_name = "N")]
    pub ssh_port: u16,
    #[arg(value_name = "UNIT")]
    pub units: Vec<String>,
}

#[derive(Args, Debug)]
pub struct SubmitArgs {
    /// Replace units already in the cluster whose content differs from the local files
    #[arg(long)]
    pub replace: bool,
    #[command(flatten)]
    pub sign: SignArg,
    #[arg(value_name = "UNIT")]
    pub units: Vec<String>,
}

#[derive(Args, Debug)]
pub struct VerifyArgs {
    #[arg(value_name = "UNIT")]
    pub units: Vec<String>,
}

#[derive(Args, Debug)]
pub struct ImportV1Args {
    /// etcd endpoints (comma-separated, http) serving fleet v1.0's registry through etcd's v2
    /// API; default: the etcd endpoints in use
    #[arg(long = "v1-endpoint", value_name = "URL")]
    pub v1_endpoint: Option<String>,
    /// Key prefix of fleet v1.0's registry in etcd's v2 keyspace
    #[arg(
        long = "v1-key-prefix",
        default_value = DEFAULT_KEY_PREFIX,
        value_name = "PREFIX"
    )]
    pub v1_key_prefix: String,
    /// Print what would be imported without writing anything
    #[arg(long = "dry-run")]
    pub dry_run: bool,
    /// Overwrite units and metadata already present with different content
    #[arg(long)]
    pub replace: bool,
}

#[derive(Args, Debug)]
pub struct CompletionArgs {
    /// The shell to generate the script for
    #[arg(value_enum)]
    pub shell: Shell,
}

/// Names of the environment variables fleet derived from its global flags.
const ENV_VARS: &[(&str, &str)] = &[
    ("debug", "FLEETCTL_DEBUG"),
    ("driver", "FLEETCTL_DRIVER"),
    ("endpoint", "FLEETCTL_ENDPOINT"),
    ("etcd_key_prefix", "FLEETCTL_ETCD_KEY_PREFIX"),
    ("key_file", "FLEETCTL_KEY_FILE"),
    ("cert_file", "FLEETCTL_CERT_FILE"),
    ("ca_file", "FLEETCTL_CA_FILE"),
    ("known_hosts_file", "FLEETCTL_KNOWN_HOSTS_FILE"),
    (
        "strict_host_key_checking",
        "FLEETCTL_STRICT_HOST_KEY_CHECKING",
    ),
    ("ssh_timeout", "FLEETCTL_SSH_TIMEOUT"),
    ("tunnel", "FLEETCTL_TUNNEL"),
    ("request_timeout", "FLEETCTL_REQUEST_TIMEOUT"),
    ("ssh_username", "FLEETCTL_SSH_USERNAME"),
    ("identity_file", "FLEETCTL_SSH_IDENTITY"),
    ("experimental_api", "FLEETCTL_EXPERIMENTAL_API"),
    ("etcd_keyfile", "FLEETCTL_ETCD_KEYFILE"),
    ("etcd_certfile", "FLEETCTL_ETCD_CERTFILE"),
    ("etcd_cafile", "FLEETCTL_ETCD_CAFILE"),
];

/// The clap command with fleet's conventions applied: help layout, and environment variables
/// that are set but empty treated as unset (fleet only used non-empty ones).
pub fn command() -> clap::Command {
    // a flag given twice takes the last value, as with fleet's pflag
    let mut cmd = Cli::command()
        .help_template(ROOT_TEMPLATE)
        .args_override_self(true)
        .mut_subcommands(|sub| {
            let template = SUB_TEMPLATE.replace("{bin}", &format!("fleetctl {}", sub.get_name()));
            sub.help_template(template)
                .disable_help_flag(true)
                .args_override_self(true)
                .mut_args(|a| {
                    if a.is_positional() || a.get_help_heading().is_some() {
                        a
                    } else {
                        a.help_heading("OPTIONS")
                    }
                })
        });
    for (id, var) in ENV_VARS {
        if std::env::var_os(var).is_some_and(|v| v.is_empty()) {
            cmd = cmd.mut_arg(*id, |a| a.env(None::<&str>));
        }
    }
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn definitions_are_consistent() {
        command().debug_assert();
    }

    #[test]
    fn every_env_var_belongs_to_a_global_flag() {
        let cmd = command();
        for (id, var) in ENV_VARS {
            let arg = cmd
                .get_arguments()
                .find(|a| a.get_id() == id)
                .unwrap_or_else(|| panic!("no argument {id}"));
            assert!(arg.is_global_set(), "{id} is not global");
            if std::env::var_os(var).is_none() {
                assert_eq!(arg.get_env().and_then(|e| e.to_str()), Some(*var), "{id}");
            }
        }
    }

    #[test]
    fn go_bool_accepts_what_go_accepts() {
        for (input, want) in [
            ("true", Some(true)),
            ("T", Some(true)),
            ("1", Some(true)),
            ("False", Some(false)),
            ("0", Some(false)),
            ("yes", None),
            ("", None),
        ] {
            assert_eq!(go_bool(input).ok(), want, "{input:?}");
        }
    }
}
