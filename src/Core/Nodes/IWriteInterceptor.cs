namespace BitmapBackup.Core.Nodes;

/// <summary>
/// Something that must see a write before it lands on a node: a backup's copy-before-write. Called on the
/// writer's thread with the node's write gate held shared, before the data is written. Throwing fails the
/// guest write, so an interceptor reports its own failures elsewhere and returns.
/// </summary>
public interface IWriteInterceptor
{
    void BeforeWrite(BlockNode node, long offset, long length);
}
