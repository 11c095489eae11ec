//! `fleetctl fd-forward SOCKET`: relay stdin/stdout to a local unix socket, the far end of a
//! tunnel that runs it as a remote command.

use std::path::Path;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::UnixStream;

use crate::error::SshError;

/// Copies our stdin to the unix socket at `socket_path` and the socket's output to our stdout.
/// See [`forward_unix_socket`] for when it ends.
pub async fn fd_forward(socket_path: &Path) -> Result<(), SshError> {
    let stdin = crate::stdin::reader().await;
    let mut stdout = tokio::io::stdout();
    forward_unix_socket(socket_path, stdin, &mut stdout).await
}

/// Relays `input` to the unix socket at `socket_path` and the socket's output to `output`.
///
/// Ends when the socket reaches EOF (all its output has been written and flushed). When `input`
/// ends first the socket's write side is shut down (a half-close, as `nc -N` does) and the
/// socket's remaining output is still relayed. fleet stopped at whichever direction ended first.
pub async fn forward_unix_socket<R, W>(
    socket_path: &Path,
    mut input: R,
    output: &mut W,
) -> Result<(), SshError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + ?Sized,
{
    let shown = socket_path.display();
    let sock = UnixStream::connect(socket_path)
        .await
        .map_err(|e| SshError::io(format!("failed dialing remote address {shown}"), e))?;
    let (mut sock_rd, mut sock_wr) = sock.into_split();
    let upstream = async {
        tokio::io::copy(&mut input, &mut sock_wr).await?;
        sock_wr.shutdown().await
    };
    let downstream = async {
        tokio::io::copy(&mut sock_rd, output).await?;
        output.flush().await
    };
    tokio::pin!(upstream, downstream);
    let mut upstream_done = false;
    loop {
        tokio::select! {
            r = &mut downstream => {
                return r.map_err(|e| SshError::io(
                    format!("encountered error during copy from {shown}"), e));
            }
            r = &mut upstream, if !upstream_done => {
                r.map_err(|e| SshError::io(format!("encountered error during copy to {shown}"), e))?;
                upstream_done = true;
            }
        }
    }
}
